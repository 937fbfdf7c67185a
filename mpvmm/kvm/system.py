"""Thin objects over the KVM file descriptors, one method per ioctl.

Like rust-vmm's kvm-ioctls: ``Kvm`` wraps /dev/kvm, ``Vm`` a VM fd, and
``Vcpu`` (vcpu.py) a vCPU fd and its mmapped ``kvm_run`` page. A failed ioctl raises
``KvmIoctlError`` naming it; the one exception is ``Vcpu.run()``, which lets
EINTR through as ``InterruptedError`` (see there). Each object owns its fd,
closes it in ``close()`` or at the end of a ``with`` block, and can be closed
twice or after a failed constructor, like CPython's ``SharedMemory``.
"""

import ctypes
import errno
import os
from collections.abc import Mapping

from mpvmm.errors import KvmError, KvmIoctlError
from mpvmm.kvm import bindings as b
from mpvmm.kvm import ioctls
from mpvmm.kvm.ioctls import ioctl as _ioctl
from mpvmm.kvm.vcpu import Vcpu

# What mpvmm cannot run without, by the kernel's name (Kvm.require_capabilities).
# The in-kernel device routes (KVM_CAP_IOEVENTFD, KVM_CAP_COALESCED_MMIO and
# KVM_CAP_COALESCED_PIO) are among them: every machine's test devices use them.
REQUIRED_CAPABILITIES: dict[str, int] = {
    "KVM_CAP_USER_MEMORY": b.KVM_CAP_USER_MEMORY,
    "KVM_CAP_IRQCHIP": b.KVM_CAP_IRQCHIP,
    "KVM_CAP_PIT2": b.KVM_CAP_PIT2,
    "KVM_CAP_SET_TSS_ADDR": b.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": b.KVM_CAP_SET_IDENTITY_MAP_ADDR,
    "KVM_CAP_EXT_CPUID": b.KVM_CAP_EXT_CPUID,
    "KVM_CAP_IRQFD": b.KVM_CAP_IRQFD,
    "KVM_CAP_IMMEDIATE_EXIT": b.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_MP_STATE": b.KVM_CAP_MP_STATE,
    "KVM_CAP_IOEVENTFD": b.KVM_CAP_IOEVENTFD,
    "KVM_CAP_COALESCED_MMIO": b.KVM_CAP_COALESCED_MMIO,
    "KVM_CAP_COALESCED_PIO": b.KVM_CAP_COALESCED_PIO,
}

# The kernel clamps KVM_GET_SUPPORTED_CPUID to 256 entries today; the E2BIG
# retry doubles the buffer up to this bound in case that ever grows.
_CPUID_ENTRIES_LIMIT = 4096
_MSR_INDEX_LIMIT = 65536

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
        """Raise KvmError unless KVM speaks API 12 and has every capability in ``caps``."""
        self.check_api_version()
        missing = [name for name, cap in caps.items() if not self.check_extension(cap)]
        if missing:
            raise KvmError(
                f"KVM on this host lacks {', '.join(missing)}, which mpvmm needs; "
                "a newer kernel or a different KVM module may have them"
            )

    def coalesced_ring_page(self) -> int:
        """The coalesced ring's page offset in a vCPU fd's mmap (KVM_CHECK_EXTENSION answers it)."""
        return self.check_extension(b.KVM_CAP_COALESCED_MMIO)

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

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """Append guest writes to ``[addr, addr + size)`` to the VM's coalesced ring instead of exiting.

        ``pio`` selects ports instead of MMIO addresses. Reads there still
        exit; a write that finds the ring full exits as an ordinary write.
        """
        zone = b.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        _ioctl(self.fd, "KVM_REGISTER_COALESCED_MMIO", ioctls.KVM_REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        zone = b.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        _ioctl(self.fd, "KVM_UNREGISTER_COALESCED_MMIO", ioctls.KVM_UNREGISTER_COALESCED_MMIO, zone)

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        """Raise ``gsi`` on the in-kernel irqchip whenever eventfd ``fd`` is signalled."""
        request = b.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd)
        _ioctl(self.fd, "KVM_IRQFD", ioctls.KVM_IRQFD, request)

    def check_extension(self, cap: int) -> int:
        """Like Kvm.check_extension, for this VM (some answers, KVM_CAP_XSAVE2's, are per VM)."""
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", ioctls.KVM_CHECK_EXTENSION, cap)

    def get_irqchip(self, chip_id: int) -> b.kvm_irqchip:
        """One chip of the in-kernel irqchip: KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC."""
        chip = b.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, "KVM_GET_IRQCHIP", ioctls.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: b.kvm_irqchip) -> None:
        _ioctl(self.fd, "KVM_SET_IRQCHIP", ioctls.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> b.kvm_pit_state2:
        state = b.kvm_pit_state2()
        _ioctl(self.fd, "KVM_GET_PIT2", ioctls.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: b.kvm_pit_state2) -> None:
        _ioctl(self.fd, "KVM_SET_PIT2", ioctls.KVM_SET_PIT2, state)

    def get_clock(self) -> b.kvm_clock_data:
        """The VM's kvmclock in nanoseconds (with ``flags`` saying what else KVM filled in)."""
        clock = b.kvm_clock_data()
        _ioctl(self.fd, "KVM_GET_CLOCK", ioctls.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: b.kvm_clock_data) -> None:
        _ioctl(self.fd, "KVM_SET_CLOCK", ioctls.KVM_SET_CLOCK, clock)

    def get_dirty_log(self, slot: int, bitmap_address: int) -> None:
        """Write slot ``slot``'s dirty bitmap at ``bitmap_address`` and start a new one.

        The slot must have been set with KVM_MEM_LOG_DIRTY_PAGES; the buffer
        holds one bit per page, rounded up to 64 bits.
        """
        log = b.kvm_dirty_log(slot=slot, dirty_bitmap=bitmap_address)
        _ioctl(self.fd, "KVM_GET_DIRTY_LOG", ioctls.KVM_GET_DIRTY_LOG, log)

    def create_vcpu(self, index: int) -> "Vcpu":
        """vCPU ``index`` (also its initial APIC ID), with its kvm_run page mapped."""
        fd = _ioctl(self.fd, "KVM_CREATE_VCPU", ioctls.KVM_CREATE_VCPU, index)
        return Vcpu(fd, index, self.mmap_size)

    def stats_fd(self) -> int:
        """A new fd for this VM's binary statistics (read with binary_stats.StatsReader)."""
        return _ioctl(self.fd, "KVM_GET_STATS_FD", ioctls.KVM_GET_STATS_FD)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
