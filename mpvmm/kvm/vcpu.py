"""A vCPU fd and its mmapped ``kvm_run`` page (created by ``Vm.create_vcpu``)."""

import ctypes
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence

from mpvmm.errors import KvmError
from mpvmm.kvm import bindings as b
from mpvmm.kvm import ioctls
from mpvmm.kvm.ioctls import ioctl as _ioctl


class Vcpu:
    """A vCPU fd and its shared kvm_run page.

    ``run_mmap`` is the MAP_SHARED mapping of the vCPU fd and ``kvm_run`` a
    ``bindings.kvm_run`` view of it (``kvm_run.from_buffer(run_mmap)``);
    ``run_address`` is the page's host address, for C code.
    """

    fd = -1
    index = -1
    run_mmap: mmap.mmap | None = None
    kvm_run: b.kvm_run | None = None

    def __init__(self, fd: int, index: int, mmap_size: int):
        """Own ``fd`` (closed again if mapping kvm_run fails)."""
        self.fd = fd
        self.index = index
        try:
            self.run_mmap = mmap.mmap(
                fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as err:
            self.close()
            raise KvmError(f"cannot map the kvm_run page of vcpu {index}: {err.strerror}") from err
        self.kvm_run = b.kvm_run.from_buffer(self.run_mmap)

    @property
    def run_address(self) -> int:
        return ctypes.addressof(self.kvm_run)

    def run(self) -> int:
        """Run the guest until its next exit and return ``kvm_run.exit_reason``.

        EINTR (a signal, or ``kvm_run.immediate_exit`` set) is raised unwrapped
        as ``InterruptedError``: the caller treats it as "interrupted", clears
        immediate_exit and carries on. A Python signal handler runs before that
        and, if it raises, its exception comes out instead. Any other failure is
        a KvmIoctlError for KVM_RUN whose ``errno`` tells EAGAIN from the fatal.
        """
        _ioctl(self.fd, "KVM_RUN", ioctls.KVM_RUN, 0, interruptible=True)
        return self.kvm_run.exit_reason

    def get_regs(self) -> b.kvm_regs:
        regs = b.kvm_regs()
        _ioctl(self.fd, "KVM_GET_REGS", ioctls.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: b.kvm_regs) -> None:
        _ioctl(self.fd, "KVM_SET_REGS", ioctls.KVM_SET_REGS, regs)

    def get_sregs(self) -> b.kvm_sregs:
        sregs = b.kvm_sregs()
        _ioctl(self.fd, "KVM_GET_SREGS", ioctls.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: b.kvm_sregs) -> None:
        _ioctl(self.fd, "KVM_SET_SREGS", ioctls.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> b.kvm_fpu:
        fpu = b.kvm_fpu()
        _ioctl(self.fd, "KVM_GET_FPU", ioctls.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: b.kvm_fpu) -> None:
        _ioctl(self.fd, "KVM_SET_FPU", ioctls.KVM_SET_FPU, fpu)

    def set_cpuid2(self, entries: Sequence[b.kvm_cpuid_entry2]) -> None:
        """The CPUID leaves this vCPU's guest sees."""
        cpuid = b.cpuid2_type(len(entries))()
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        _ioctl(self.fd, "KVM_SET_CPUID2", ioctls.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> list[b.kvm_cpuid_entry2]:
        """Copies of the CPUID entries this vCPU was given (KVM_SET_CPUID2)."""
        cpuid = b.cpuid2_type(max_entries)()
        cpuid.nent = max_entries
        _ioctl(self.fd, "KVM_GET_CPUID2", ioctls.KVM_GET_CPUID2, cpuid)
        return [b.kvm_cpuid_entry2.from_buffer_copy(e) for e in cpuid.entries[: cpuid.nent]]

    def get_msrs(self, indices: Iterable[int], strict: bool = True) -> dict[int, int]:
        """MSR index -> value. KVM stops at the first MSR it cannot read: KvmError names it,
        or, not ``strict``, the MSRs before it are returned."""
        indices = list(indices)
        msrs = b.msrs_type(len(indices))()
        msrs.nmsrs = len(indices)
        for entry, index in zip(msrs.entries, indices):
            entry.index = index
        done = _ioctl(self.fd, "KVM_GET_MSRS", ioctls.KVM_GET_MSRS, msrs)
        if done < len(indices) and strict:
            raise KvmError(f"KVM_GET_MSRS cannot read MSR {indices[done]:#x} on vcpu {self.index}")
        return {entry.index: entry.data for entry in msrs.entries[:done]}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """Write MSRs; KvmError names the first MSR KVM would not write."""
        items = list(values.items())
        msrs = b.msrs_type(len(items))()
        msrs.nmsrs = len(items)
        for entry, (index, data) in zip(msrs.entries, items):
            entry.index, entry.data = index, data
        done = _ioctl(self.fd, "KVM_SET_MSRS", ioctls.KVM_SET_MSRS, msrs)
        if done < len(items):
            index = items[done][0]
            raise KvmError(f"KVM_SET_MSRS cannot write MSR {index:#x} on vcpu {self.index}")

    def get_mp_state(self) -> int:
        """One of bindings.KVM_MP_STATE_*."""
        state = b.kvm_mp_state()
        _ioctl(self.fd, "KVM_GET_MP_STATE", ioctls.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = b.kvm_mp_state(mp_state=mp_state)
        _ioctl(self.fd, "KVM_SET_MP_STATE", ioctls.KVM_SET_MP_STATE, state)

    def get_lapic(self) -> b.kvm_lapic_state:
        """The local APIC's register page (needs the in-kernel irqchip)."""
        lapic = b.kvm_lapic_state()
        _ioctl(self.fd, "KVM_GET_LAPIC", ioctls.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: b.kvm_lapic_state) -> None:
        _ioctl(self.fd, "KVM_SET_LAPIC", ioctls.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self) -> b.kvm_vcpu_events:
        """Pending and injected exceptions, interrupts, NMIs and SMIs."""
        events = b.kvm_vcpu_events()
        _ioctl(self.fd, "KVM_GET_VCPU_EVENTS", ioctls.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: b.kvm_vcpu_events) -> None:
        _ioctl(self.fd, "KVM_SET_VCPU_EVENTS", ioctls.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> b.kvm_debugregs:
        debugregs = b.kvm_debugregs()
        _ioctl(self.fd, "KVM_GET_DEBUGREGS", ioctls.KVM_GET_DEBUGREGS, debugregs)
        return debugregs

    def set_debugregs(self, debugregs: b.kvm_debugregs) -> None:
        _ioctl(self.fd, "KVM_SET_DEBUGREGS", ioctls.KVM_SET_DEBUGREGS, debugregs)

    def get_xsave(self, size: int = ctypes.sizeof(b.kvm_xsave)):
        """The XSAVE image of ``size`` bytes: KVM_GET_XSAVE, or KVM_GET_XSAVE2 beyond 4 KiB."""
        xsave = b.xsave_type(size)()
        if ctypes.sizeof(xsave) > ctypes.sizeof(b.kvm_xsave):
            _ioctl(self.fd, "KVM_GET_XSAVE2", ioctls.KVM_GET_XSAVE2, xsave)
        else:
            _ioctl(self.fd, "KVM_GET_XSAVE", ioctls.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave) -> None:
        """Any size ``get_xsave`` returned: KVM reads as much as KVM_CAP_XSAVE2 says."""
        _ioctl(self.fd, "KVM_SET_XSAVE", ioctls.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> b.kvm_xcrs:
        xcrs = b.kvm_xcrs()
        _ioctl(self.fd, "KVM_GET_XCRS", ioctls.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: b.kvm_xcrs) -> None:
        _ioctl(self.fd, "KVM_SET_XCRS", ioctls.KVM_SET_XCRS, xcrs)

    def stats_fd(self) -> int:
        """A new fd for this vCPU's binary statistics (read with binary_stats.StatsReader)."""
        return _ioctl(self.fd, "KVM_GET_STATS_FD", ioctls.KVM_GET_STATS_FD)

    def close(self) -> None:
        """Unmap kvm_run and close the fd; safe twice and after a failed __init__.

        Our ``kvm_run`` view goes first, since an mmap with a ctypes view on it
        cannot close. If a caller still holds a view of its own, close() leaves
        the mapping to be unmapped when the last such view is freed (each view
        keeps the mmap alive), so no view is ever left dangling.
        """
        self.kvm_run = None
        if self.run_mmap is not None:
            run_mmap, self.run_mmap = self.run_mmap, None
            try:
                run_mmap.close()
            except BufferError:
                pass  # views still exported: unmapped when they are freed
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Vcpu":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
