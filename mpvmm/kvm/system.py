"""Thin objects over the KVM file descriptors, one method per ioctl.

Like rust-vmm's kvm-ioctls: ``Kvm`` wraps /dev/kvm, ``Vm`` a VM fd, ``Vcpu`` a
vCPU fd and its mmapped ``kvm_run`` page. A failed ioctl raises
``KvmIoctlError`` naming it; the one exception is ``Vcpu.run()``, which lets
EINTR through as ``InterruptedError`` (see there). Each object owns its fd,
closes it in ``close()`` or at the end of a ``with`` block, and can be closed
twice or after a failed constructor, like CPython's ``SharedMemory``.
"""

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence

from mpvmm.errors import KvmError, KvmIoctlError
from mpvmm.kvm import bindings as b
from mpvmm.kvm import ioctls

# What mpvmm cannot run without, by the kernel's name (Kvm.require_capabilities).
REQUIRED_CAPABILITIES: dict[str, int] = {
    "KVM_CAP_USER_MEMORY": b.KVM_CAP_USER_MEMORY,
    "KVM_CAP_IRQCHIP": b.KVM_CAP_IRQCHIP,
    "KVM_CAP_PIT2": b.KVM_CAP_PIT2,
    "KVM_CAP_SET_TSS_ADDR": b.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": b.KVM_CAP_SET_IDENTITY_MAP_ADDR,
    "KVM_CAP_EXT_CPUID": b.KVM_CAP_EXT_CPUID,
    "KVM_CAP_IOEVENTFD": b.KVM_CAP_IOEVENTFD,
    "KVM_CAP_IRQFD": b.KVM_CAP_IRQFD,
    "KVM_CAP_IMMEDIATE_EXIT": b.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_MP_STATE": b.KVM_CAP_MP_STATE,
}

# The kernel clamps KVM_GET_SUPPORTED_CPUID to 256 entries today; the E2BIG
# retry doubles the buffer up to this bound in case that ever grows.
_CPUID_ENTRIES_LIMIT = 4096
_MSR_INDEX_LIMIT = 65536

# fcntl.ioctl passes an int argument as a C int, too narrow for values such
# as KVM_SET_TSS_ADDR's 0xfffbd000; those go through libc's ioctl as an
# unsigned long. CDLL (not PyDLL) calls release the GIL like fcntl does.
_C_INT_MIN, _C_INT_MAX = -(2**31), 2**31 - 1
_libc_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl.restype = ctypes.c_int


def _ioctl(fd: int, name: str, request: int, arg=0, *, interruptible: bool = False) -> int:
    """Issue one ioctl and return its result; a failure raises KvmIoctlError(name).

    ``arg`` is an int passed by value or a ctypes object passed by reference
    (fcntl copies one of up to 1 KiB through a buffer and back). With
    ``interruptible``, EINTR is raised as-is as ``InterruptedError``.
    """
    try:
        if isinstance(arg, int) and not _C_INT_MIN <= arg <= _C_INT_MAX:
            result = _libc_ioctl(fd, request, arg)
            if result < 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
            return result
        return fcntl.ioctl(fd, request, arg)
    except OSError as err:
        if interruptible and err.errno == errno.EINTR:
            raise  # an InterruptedError, by OSError's errno mapping
        raise KvmIoctlError(name, err.errno, err.strerror) from err


def host_address(buffer) -> int:
    """The host address of a writable buffer's first byte (an mmap, a bytearray).

    Holds no export of the buffer, so it can still be closed: the caller keeps
    it alive and mapped for as long as KVM or C code uses the address.
    """
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class Kvm:
    """/dev/kvm: the API version, capabilities, supported CPUID, new VMs."""

    fd = -1  # class-level default, so close() works after a failed __init__

    def __init__(self, path: str = "/dev/kvm"):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError as err:  # EACCES and EPERM
            raise KvmError(
                f"no permission to open {path}: add this user to the kvm group "
                "(then log in again) or run as root"
            ) from err
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                # ENODEV/ENXIO: the node exists but no KVM module backs it.
                raise KvmError(
                    f"{path} is missing: load the kvm_intel or kvm_amd module, "
                    "or enable virtualisation (VT-x/AMD-V) in the firmware"
                ) from err
            raise KvmError(f"cannot open {path}: {err.strerror}") from err

    def api_version(self) -> int:
        return _ioctl(self.fd, "KVM_GET_API_VERSION", ioctls.KVM_GET_API_VERSION)

    def check_api_version(self) -> None:
        """Raise KvmError unless the kernel speaks the one stable API, 12."""
        version = self.api_version()
        if version != b.KVM_API_VERSION:
            raise KvmError(
                f"{self.path} speaks KVM API version {version}; "
                f"mpvmm needs version {b.KVM_API_VERSION}"
            )

    def check_extension(self, cap: int) -> int:
        """0 if ``cap`` is unsupported, else a positive, capability-specific value."""
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", ioctls.KVM_CHECK_EXTENSION, cap)

    def require_capabilities(self, caps: Mapping[str, int] = REQUIRED_CAPABILITIES) -> None:
        """Raise KvmError naming every capability in ``caps`` that KVM lacks."""
        missing = [name for name, cap in caps.items() if not self.check_extension(cap)]
        if missing:
            raise KvmError(
                f"KVM on this host lacks {', '.join(missing)}, which mpvmm needs; "
                "a newer kernel or a different KVM module may have them"
            )

    def vcpu_mmap_size(self) -> int:
        """Bytes to mmap from a vCPU fd: kvm_run plus the pages that follow it."""
        return _ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE", ioctls.KVM_GET_VCPU_MMAP_SIZE)

    def max_vcpus(self) -> int:
        """The most vCPUs a VM may have (api.rst: NR_VCPUS if MAX_VCPUS is absent, else 4)."""
        return (self.check_extension(b.KVM_CAP_MAX_VCPUS)
                or self.check_extension(b.KVM_CAP_NR_VCPUS) or 4)  # fmt: skip

    def supported_cpuid(self, max_entries: int = 256) -> list[b.kvm_cpuid_entry2]:
        """Copies of the CPUID entries KVM can offer a guest."""
        nent = max_entries
        while True:
            cpuid = b.cpuid2_type(nent)()
            cpuid.nent = nent
            try:
                _ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", ioctls.KVM_GET_SUPPORTED_CPUID, cpuid)
            except KvmIoctlError as err:
                if err.errno != errno.E2BIG or nent >= _CPUID_ENTRIES_LIMIT:
                    raise
                nent *= 2
                continue
            return [b.kvm_cpuid_entry2.from_buffer_copy(e) for e in cpuid.entries[: cpuid.nent]]

    def msr_index_list(self) -> list[int]:
        """The MSR indices KVM_GET_MSRS/KVM_SET_MSRS accept on this host."""
        nmsrs = 256
        while True:
            msr_list = b.msr_list_type(nmsrs)()
            msr_list.nmsrs = nmsrs
            try:
                _ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", ioctls.KVM_GET_MSR_INDEX_LIST, msr_list)
            except KvmIoctlError as err:
                if err.errno != errno.E2BIG or nmsrs >= _MSR_INDEX_LIMIT:
                    raise
                # On E2BIG the kernel writes back how many there are.
                nmsrs = max(msr_list.nmsrs, nmsrs * 2)
                continue
            return list(msr_list.indices[: msr_list.nmsrs])

    def create_vm(self) -> "Vm":
        """A new VM (machine type 0, the default x86 VM)."""
        mmap_size = self.vcpu_mmap_size()
        return Vm(_ioctl(self.fd, "KVM_CREATE_VM", ioctls.KVM_CREATE_VM, 0), mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Vm:
    """A VM fd: memory slots, the in-kernel irqchip and PIT, eventfds, vCPUs."""

    fd = -1

    def __init__(self, fd: int, mmap_size: int):
        """Own ``fd``; ``mmap_size`` is KVM_GET_VCPU_MMAP_SIZE, for the vCPUs."""
        self.fd = fd
        self.mmap_size = mmap_size

    def check_extension(self, cap: int) -> int:
        """Like Kvm.check_extension, for this VM (KVM_CAP_CHECK_EXTENSION_VM)."""
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", ioctls.KVM_CHECK_EXTENSION, cap)

    def create_irqchip(self) -> None:
        """The in-kernel PIC pair, IOAPIC and per-vCPU local APICs."""
        _ioctl(self.fd, "KVM_CREATE_IRQCHIP", ioctls.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        """The in-kernel i8254; KVM_PIT_SPEAKER_DUMMY also answers port 0x61."""
        config = b.kvm_pit_config(flags=flags)
        _ioctl(self.fd, "KVM_CREATE_PIT2", ioctls.KVM_CREATE_PIT2, config)

    def set_tss_addr(self, addr: int) -> None:
        """Where VMX may put its three-page real-mode TSS (guest-physical)."""
        _ioctl(self.fd, "KVM_SET_TSS_ADDR", ioctls.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """Where VMX may put its one-page EPT identity map (guest-physical)."""
        value = ctypes.c_uint64(addr)
        _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ioctls.KVM_SET_IDENTITY_MAP_ADDR, value)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:  # fmt: skip
        """Map host memory at ``userspace_addr`` into the guest; size 0 deletes the slot."""
        region = b.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
            memory_size=memory_size, userspace_addr=userspace_addr,
        )  # fmt: skip
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", ioctls.KVM_SET_USER_MEMORY_REGION, region)

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:  # fmt: skip
        """Signal eventfd ``fd`` on a guest write to ``addr`` instead of exiting.

        ``pio`` selects a port instead of an MMIO address; with ``datamatch``
        only writes of that value signal; ``deassign`` removes the binding.
        """
        flags = (
            (b.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
            | (b.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
            | (b.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        )
        request = b.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags
        )
        _ioctl(self.fd, "KVM_IOEVENTFD", ioctls.KVM_IOEVENTFD, request)

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        """Raise ``gsi`` on the in-kernel irqchip whenever eventfd ``fd`` is signalled."""
        request = b.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd)
        _ioctl(self.fd, "KVM_IRQFD", ioctls.KVM_IRQFD, request)

    def irq_line(self, irq: int, level: int) -> None:
        """Set the level of an in-kernel irqchip input (1 raised, 0 lowered)."""
        request = b.kvm_irq_level(irq=irq, level=level)
        _ioctl(self.fd, "KVM_IRQ_LINE", ioctls.KVM_IRQ_LINE, request)

    def enable_cap(self, cap: int, args: Sequence[int] = (), flags: int = 0) -> None:
        """Turn on a VM capability that needs enabling (up to four arguments)."""
        request = b.kvm_enable_cap(cap=cap, flags=flags)
        if len(args) > len(request.args):
            raise ValueError(f"KVM_ENABLE_CAP takes at most {len(request.args)} arguments")
        for i, arg in enumerate(args):
            request.args[i] = arg
        _ioctl(self.fd, "KVM_ENABLE_CAP", ioctls.KVM_ENABLE_CAP, request)

    def create_vcpu(self, index: int) -> "Vcpu":
        """vCPU ``index`` (also its initial APIC ID), with its kvm_run page mapped."""
        fd = _ioctl(self.fd, "KVM_CREATE_VCPU", ioctls.KVM_CREATE_VCPU, index)
        return Vcpu(fd, index, self.mmap_size)

    def stats_fd(self) -> int:
        """A new fd for this VM's binary statistics (read with stats.StatsReader)."""
        return _ioctl(self.fd, "KVM_GET_STATS_FD", ioctls.KVM_GET_STATS_FD)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """MSR index -> value; KvmError names the first MSR KVM would not read."""
        indices = list(indices)
        msrs = b.msrs_type(len(indices))()
        msrs.nmsrs = len(indices)
        for entry, index in zip(msrs.entries, indices):
            entry.index = index
        done = _ioctl(self.fd, "KVM_GET_MSRS", ioctls.KVM_GET_MSRS, msrs)
        if done < len(indices):  # KVM stops at the first MSR it cannot read
            raise KvmError(f"KVM_GET_MSRS cannot read MSR {indices[done]:#x} on vcpu {self.index}")
        return {entry.index: entry.data for entry in msrs.entries}

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

    def stats_fd(self) -> int:
        """A new fd for this vCPU's binary statistics (read with stats.StatsReader)."""
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
