"""A Linux kernel in a VM (``mpvmm start --kernel``): reading it, placing it, booting its vCPUs.

``LinuxBoot.from_files`` reads and checks the kernel, initrd and command line
before anything else is created (bad input is a one-line error, exit 2);
``load`` writes the kernel, initrd, command line, zero page, MP table, ACPI
tables, GDT and page tables into guest RAM; the ``LinuxGuest`` it returns
gives the BSP the 64-bit entry state and leaves every AP in KVM's
UNINITIALIZED state for the kernel's INIT/SIPI through the in-kernel LAPICs.

The kernel runs on the "pc" device set, its UART and i8042 interrupts
raised through irqfds, the host terminal feeding its console. It ends the
run itself: power-off and reboot through the device model (ACPI, i8042
reset), a triple fault or a KVM system event through a vCPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mpvmm.arguments import format_size
from mpvmm.devicemodel.pc import IRQ_LINES
from mpvmm.errors import GuestLoadError, UsageError
from mpvmm.kvm import bindings as kb
from mpvmm.supervisor.ending import GuestEvent
from mpvmm.supervisor.guest import Guest, GuestCounts, GuestSource, MachineSpec
from mpvmm.vcpu_worker.outcome import Fault, VcpuOutcome
from mpvmm.x86 import acpi, bzimage, e820, layout, linux, mptable, zeropage
from mpvmm.x86.loader import load_elf

# Below this a kernel has no room to decompress or run, whatever its size.
MIN_MEMORY = 32 << 20
# A vCPU's KVM_EXIT_SYSTEM_EVENT type -> how the guest ended.
SYSTEM_EVENTS = {
    kb.KVM_SYSTEM_EVENT_SHUTDOWN: GuestEvent.POWER_OFF,
    kb.KVM_SYSTEM_EVENT_RESET: GuestEvent.REBOOT,
    kb.KVM_SYSTEM_EVENT_CRASH: GuestEvent.CRASH,
}


class InitrdError(GuestLoadError):
    """The initrd is missing, unreadable or does not fit."""


def _read(path: str, what: str, error=GuestLoadError) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise error(f"{what} {path}: {err.strerror}") from err


def _align_down(value: int, alignment: int) -> int:
    return value & ~(alignment - 1)


@dataclass(frozen=True)
class LinuxBoot(GuestSource):
    """A checked kernel, initrd and command line, ready to be loaded."""

    machine = MachineSpec("pc", IRQ_LINES, host_input=True)
    workload = "linux"

    kernel: bzimage.KernelImage
    initrd: bytes | None
    cmdline: bytes
    cpus: int
    virtio_windows: tuple[tuple[int, int], ...] = ()  # (MMIO window, GSI) of each virtio device

    @classmethod
    def from_files(cls, kernel_path: str, initrd_path: str | None, cmdline: str | None,
                   cpus: int, memory_size: int, virtio_windows=()) -> "LinuxBoot":
        if memory_size < MIN_MEMORY:
            raise UsageError(f"--memory {format_size(memory_size)} is too small to boot Linux "
                             f"(needs at least {format_size(MIN_MEMORY)})")
        if not 1 <= cpus <= 254:
            raise UsageError(f"a Linux guest takes 1 to 254 vCPUs (xAPIC ids), not {cpus}")
        data = _read(kernel_path, "kernel", bzimage.KernelImageError)
        if len(data) > memory_size:
            raise GuestLoadError(f"kernel {kernel_path} ({len(data)} bytes) is larger than guest memory "
                                 f"({memory_size} bytes)")
        kernel = bzimage.read_kernel(data, f"kernel {kernel_path}")
        initrd = None
        if initrd_path is not None:
            initrd = _read(initrd_path, "initrd", InitrdError)
            if len(initrd) > memory_size:
                raise InitrdError(f"initrd {initrd_path} ({len(initrd)} bytes) is larger than guest memory "
                                  f"({memory_size} bytes)")
        text = linux.DEFAULT_CMDLINE if cmdline is None else cmdline
        try:
            encoded = text.encode("ascii")
        except UnicodeEncodeError:
            raise UsageError("--cmdline must be ASCII") from None
        if b"\0" in encoded:
            raise UsageError("--cmdline must not contain NUL bytes")
        capacity = min(zeropage.cmdline_capacity(kernel.header), layout.LINUX_CMDLINE_MAX - 1)
        if len(encoded) > capacity:
            raise UsageError(f"--cmdline is {len(encoded)} bytes; this kernel accepts at most {capacity}")
        return cls(kernel, initrd, encoded, cpus, tuple(virtio_windows))

    # --- Into guest memory. ---

    def load(self, memory) -> "LinuxGuest":
        entry, kernel_end = self._load_kernel(memory)
        low_ram_end = min(memory.size, layout.MMIO_HOLE_START)
        initrd = None
        if self.initrd is not None:
            limit = low_ram_end
            if self.kernel.header is not None:
                limit = min(limit, self.kernel.header.initrd_addr_max + 1)
            address = _align_down(limit - len(self.initrd), layout.PAGE_SIZE)
            if address < kernel_end:
                raise InitrdError(
                    f"initrd ({len(self.initrd)} bytes) does not fit guest memory above the kernel "
                    f"(which ends at {kernel_end:#x}); give the VM more --memory")
            memory.write(address, self.initrd)
            initrd = (address, len(self.initrd))
        memory.write(layout.LINUX_CMDLINE_ADDR, self.cmdline + b"\0")
        memory.write(layout.LINUX_MPTABLE_ADDR, mptable.build_mptable(layout.LINUX_MPTABLE_ADDR, self.cpus))
        rsdp, tables = acpi.build_acpi(layout.LINUX_ACPI_ADDR, self.cpus, acpi.virtio_devices(self.virtio_windows))
        if len(tables) > layout.LINUX_ACPI_MAX:
            raise UsageError(f"ACPI tables for {self.cpus} vCPUs do not fit their slot")
        memory.write(layout.LINUX_ACPI_ADDR, tables)
        ram = [(address, size) for address, size, _offset in memory.regions()]
        page = zeropage.build_zero_page(self.kernel.header, e820.memory_map(ram),
                                        layout.LINUX_CMDLINE_ADDR, initrd, rsdp)
        memory.write(layout.LINUX_ZERO_PAGE_ADDR, page)
        memory.write(layout.LINUX_GDT_ADDR, linux.gdt_bytes())
        for address, table in linux.identity_tables():
            memory.write(address, table)
        return LinuxGuest(entry, self.cpus)

    def _load_kernel(self, memory) -> tuple[int, int]:
        """Load the kernel; returns its entry and the first address past what it will use."""
        kernel = self.kernel
        if kernel.vmlinux is not None:
            loaded = load_elf(memory, kernel.vmlinux, "kernel")
            if loaded.low < layout.LINUX_HIGH_MEMORY:
                raise bzimage.KernelImageError("kernel loads below 1 MiB, over the boot structures")
            return loaded.entry, loaded.high
        # The bzImage's own decompressor: it moves itself to LOAD_PHYSICAL_ADDR
        # (or higher) and needs init_size bytes from there.
        header = kernel.header
        code = kernel.protected_mode
        address = layout.LINUX_BZIMAGE_LOAD_ADDR
        end = max(address + len(code), max(header.pref_address, 0x1000000) + header.init_size)
        if not memory.contains(address, end - address):
            raise bzimage.KernelImageError(f"kernel needs {format_size(end)} of guest memory to decompress; "
                                           f"give the VM more --memory")
        memory.write(address, code)
        return address + bzimage.STARTUP_64_OFFSET, end


class LinuxGuest(Guest):
    """A kernel loaded at ``entry`` for ``cpus`` vCPUs."""

    stop_grace_seconds = 0.0  # a kernel has no stop flag to ask for: its vCPUs are stopped at once

    def __init__(self, entry: int, cpus: int):
        self.entry = entry
        self.cpus = cpus

    def set_up_vcpus(self, kvm, vcpus: Sequence) -> None:
        """CPUID, MSRs and LINT0/1 on every vCPU; the entry state on the BSP (vCPU 0) only."""
        supported = kvm.supported_cpuid()
        msrs = linux.boot_msrs(set(kvm.msr_index_list()))
        for vcpu in vcpus:
            vcpu.set_cpuid2(linux.linux_cpuid(supported, vcpu.index, self.cpus))
            vcpu.set_msrs(msrs)
            lapic = vcpu.get_lapic()
            linux.set_lint_modes(lapic)
            vcpu.set_lapic(lapic)
            if vcpu.index == 0:
                sregs = vcpu.get_sregs()
                linux.boot_sregs(sregs)
                vcpu.set_sregs(sregs)
                vcpu.set_regs(linux.boot_regs(self.entry))
                vcpu.set_fpu(linux.boot_fpu())

    def request_stop(self) -> None:
        pass  # nothing to ask: stop_grace_seconds is 0

    def counts(self, index: int) -> GuestCounts | None:
        return None  # a kernel keeps no counts for us

    def atomic_total(self) -> int | None:
        return None

    def describe(self) -> dict:
        return {"kind": "linux", "entry": self.entry}

    def ending(self, outcome: VcpuOutcome) -> GuestEvent | None:
        """A triple fault resets a PC; a system event is the kernel powering off, rebooting or crashing."""
        match outcome:
            case Fault(reason=kb.KVM_EXIT_SHUTDOWN):
                return GuestEvent.TRIPLE_FAULT
            case Fault(reason=kb.KVM_EXIT_SYSTEM_EVENT, system_event=event_type):
                return SYSTEM_EVENTS.get(event_type)
            case _:
                return None
