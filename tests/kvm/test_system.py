"""The KVM objects against the real /dev/kvm, ending in a tiny real guest.

The guest is kvm-ioctls' ``test_run_code`` in spirit: a few real-mode
instructions that leave through a port write, an MMIO write, an MMIO read and
``hlt``, each exit checked field by field.
"""

import ctypes
import errno
import mmap
import os
import signal

import pytest

from mpvmm.errors import KvmError, KvmIoctlError
from mpvmm.kvm import bindings as b
from mpvmm.kvm import system
from mpvmm.kvm.binary_stats import StatsReader
from mpvmm.kvm.system import REQUIRED_CAPABILITIES, Kvm
from mpvmm.kvm.vcpu import Vcpu

pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs read-write /dev/kvm"
)

# Guest-physical map of the test guest: one 16 KiB slot of RAM holding the
# code; the MMIO addresses lie above it, where no slot is, so they exit.
RAM_ADDR = 0x1000
RAM_SIZE = 0x4000
MMIO_WRITE_ADDR = 0x8000
MMIO_READ_ADDR = 0x8008
PORT = 0x3F8

# Real mode, CS = DS = 0, loaded at RAM_ADDR (as --32, .code16):
GUEST_CODE = bytes.fromhex(
    "ba f8 03"  # mov $0x3f8, %dx
    "b0 42"  # mov $0x42, %al
    "ee"  # out %al, (%dx)            -> IO exit, 1 byte 0x42
    "c7 06 00 80 ef be"  # movw $0xbeef, (0x8000)  -> MMIO write, 2 bytes
    "a1 08 80"  # mov (0x8008), %ax          -> MMIO read, 2 bytes
    "ef"  # out %ax, (%dx)            -> IO exit, 2 bytes: what the read got
    "f4"  # hlt                       -> HLT exit (no in-kernel irqchip)
)
SPIN_CODE = bytes.fromhex("eb fe")  # 1: jmp 1b


def host_address(buffer: mmap.mmap) -> int:
    """The address of an mmap's first byte, for KVM_SET_USER_MEMORY_REGION."""
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # no export left, so the mmap can still be closed


@pytest.fixture
def kvm():
    with Kvm() as kvm:
        yield kvm


@pytest.fixture
def guest(kvm):
    """A VM with RAM at RAM_ADDR and vCPU 0 set to real mode at RAM_ADDR."""
    ram = mmap.mmap(-1, RAM_SIZE)
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vm.set_tss_addr(0xFFFBD000)  # above 2**31: exercises the wide-argument path
        vm.set_user_memory_region(0, RAM_ADDR, RAM_SIZE, host_address(ram))
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = b.kvm_regs(rip=RAM_ADDR, rflags=0x2)  # bit 1 of RFLAGS is always set
        vcpu.set_regs(regs)
        yield vm, vcpu, ram
    ram.close()


def io_data(vcpu: Vcpu) -> bytes:
    io = vcpu.kvm_run.io
    start = io.data_offset
    return bytes(vcpu.run_mmap[start : start + io.size * io.count])


def test_api_version_is_12(kvm):
    assert kvm.api_version() == 12
    kvm.check_api_version()


def test_required_capabilities_present(kvm):
    kvm.require_capabilities()
    assert all(kvm.check_extension(cap) for cap in REQUIRED_CAPABILITIES.values())
    assert kvm.max_vcpus() >= 1
    assert kvm.vcpu_mmap_size() >= mmap.PAGESIZE


def test_missing_capability_is_named(kvm):
    with pytest.raises(KvmError, match="KVM_CAP_BOGUS"):
        kvm.require_capabilities({"KVM_CAP_USER_MEMORY": b.KVM_CAP_USER_MEMORY,
                                  "KVM_CAP_BOGUS": 0x7FFFFFF0})  # fmt: skip


def test_supported_cpuid_has_entries(kvm):
    entries = kvm.supported_cpuid()
    assert entries
    assert any(entry.function == 0 for entry in entries)
    # A buffer too small is retried larger on E2BIG.
    assert len(kvm.supported_cpuid(max_entries=1)) == len(entries)


def test_msr_index_list(kvm):
    assert 0x10 in kvm.msr_index_list()  # IA32_TIME_STAMP_COUNTER


def test_missing_device_says_what_to_do(tmp_path):
    with pytest.raises(KvmError, match="missing.*kvm_intel or kvm_amd") as info:
        Kvm(str(tmp_path / "kvm"))
    assert "\n" not in str(info.value)


def test_no_permission_suggests_kvm_group(monkeypatch):
    def refuse(path, flags):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(system.os, "open", refuse)
    with pytest.raises(KvmError, match="no permission.*kvm group"):
        Kvm()


def test_failed_ioctl_names_itself():
    with Kvm("/dev/null") as not_kvm:
        with pytest.raises(KvmIoctlError, match="KVM_GET_API_VERSION") as info:
            not_kvm.api_version()
    assert info.value.name == "KVM_GET_API_VERSION"
    assert info.value.errno == errno.ENOTTY


def test_failed_vm_ioctl_names_itself(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmIoctlError, match="KVM_SET_USER_MEMORY_REGION") as info:
            vm.set_user_memory_region(0, 0x1000, 123, 0)  # size not page-aligned
    assert info.value.errno == errno.EINVAL


def test_close_is_safe_twice_and_after_failed_constructor(kvm):
    Vcpu.__new__(Vcpu).close()
    fd = os.open("/dev/null", os.O_RDWR)
    with pytest.raises(KvmError, match="kvm_run page of vcpu 3"):
        Vcpu(fd, 3, mmap.PAGESIZE)  # /dev/null cannot be mapped shared
    with pytest.raises(OSError):
        os.fstat(fd)  # the failed constructor closed the fd it was given
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        held_view = vcpu.kvm_run  # a caller's view must not make close() fail
        vcpu.close()
        vcpu.close()
        assert held_view.exit_reason == 0
        vm.close()
    kvm.close()
    kvm.close()


def test_regs_round_trip(guest):
    _, vcpu, _ = guest
    regs = vcpu.get_regs()
    regs.rax, regs.rbx, regs.r15, regs.rip = 1, 2, 0xFEDCBA9876543210, 0x1234
    vcpu.set_regs(regs)
    again = vcpu.get_regs()
    assert (again.rax, again.rbx, again.r15, again.rip) == (1, 2, 0xFEDCBA9876543210, 0x1234)


def test_vcpu_state_ioctls(kvm):
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.create_pit2(b.KVM_PIT_SPEAKER_DUMMY)
        with vm.create_vcpu(0) as vcpu:
            vcpu.set_cpuid2(kvm.supported_cpuid())
            assert vcpu.get_mp_state() == b.KVM_MP_STATE_RUNNABLE
            vcpu.set_mp_state(b.KVM_MP_STATE_RUNNABLE)
            lapic = vcpu.get_lapic()
            vcpu.set_lapic(lapic)
            fpu = vcpu.get_fpu()
            fpu.fcw = 0x37F
            vcpu.set_fpu(fpu)
            assert vcpu.get_fpu().fcw == 0x37F
            vcpu.set_msrs({0x174: 0x10})  # IA32_SYSENTER_CS
            assert vcpu.get_msrs([0x174]) == {0x174: 0x10}
            with pytest.raises(KvmError, match="MSR 0xdeadbeef"):
                vcpu.get_msrs([0xDEADBEEF])


def test_ioeventfd_takes_a_port_write_in_the_kernel(guest):
    """The guest's one-byte `out` signals the eventfd instead of exiting; deassigned, it is gone."""
    vm, vcpu, ram = guest
    ram[: len(GUEST_CODE)] = GUEST_CODE
    notify = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(notify, PORT, 1, pio=True)
        assert vcpu.run() == b.KVM_EXIT_MMIO  # the first exit is the MMIO write after the `out`
        assert os.eventfd_read(notify) == 1
        vm.ioeventfd(notify, PORT, 1, pio=True, deassign=True)
        with pytest.raises(KvmIoctlError, match="KVM_IOEVENTFD") as info:
            vm.ioeventfd(notify, PORT, 1, pio=True, deassign=True)
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(notify)


def ring_entries(page: mmap.mmap) -> list[b.kvm_coalesced_mmio]:
    """Take every entry of a mapped coalesced ring, as its consumer does (advancing ``first``)."""
    ring = b.kvm_coalesced_mmio_ring.from_buffer(page)
    size = ctypes.sizeof(b.kvm_coalesced_mmio)
    taken = []
    while ring.first != ring.last:
        offset = ctypes.sizeof(ring) + ring.first * size
        taken.append(b.kvm_coalesced_mmio.from_buffer_copy(page, offset))
        ring.first = (ring.first + 1) % b.COALESCED_RING_ENTRIES
    del ring
    return taken


def test_coalesced_writes_stay_in_the_kernel_and_reach_the_ring(kvm, guest):
    """The `out` and the MMIO write land in the ring page a second mapping sees; the read still exits."""
    vm, vcpu, ram = guest
    ram[: len(GUEST_CODE)] = GUEST_CODE
    page_offset = kvm.coalesced_ring_page()
    assert page_offset * mmap.PAGESIZE < kvm.vcpu_mmap_size()
    vm.register_coalesced_mmio(PORT, 1, pio=True)
    vm.register_coalesced_mmio(MMIO_WRITE_ADDR, 8)
    # Only the ring page, from the vCPU fd: what the device model maps.
    page = mmap.mmap(vcpu.fd, mmap.PAGESIZE, offset=page_offset * mmap.PAGESIZE)
    try:
        assert vcpu.run() == b.KVM_EXIT_MMIO  # the read of 0x8008: both writes before it were taken
        assert vcpu.kvm_run.mmio.is_write == 0
        first, second = ring_entries(page)
        assert (first.phys_addr, first.len, first.pio, bytes(first.data[:1])) == (PORT, 1, 1, b"\x42")
        assert (second.phys_addr, second.len, second.pio) == (MMIO_WRITE_ADDR, 2, 0)
        assert bytes(second.data[:2]) == (0xBEEF).to_bytes(2, "little")
        vm.unregister_coalesced_mmio(PORT, 1, pio=True)
        assert vcpu.run() == b.KVM_EXIT_IO  # the second `out`: no zone any more
        assert ring_entries(page) == []
    finally:
        page.close()


def test_irqfd_is_registered_once_and_deassigned(kvm):
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        irq = os.eventfd(0)
        try:
            vm.irqfd(irq, 5)
            with pytest.raises(KvmIoctlError, match="KVM_IRQFD") as info:
                vm.irqfd(irq, 5)  # KVM keeps one binding per eventfd
            assert info.value.errno == errno.EBUSY
            vm.irqfd(irq, 5, flags=b.KVM_IRQFD_FLAG_DEASSIGN)
            vm.irqfd(irq, 5)  # free again once deassigned
        finally:
            os.close(irq)


def test_run_code(guest):
    _, vcpu, ram = guest
    ram[: len(GUEST_CODE)] = GUEST_CODE
    run = vcpu.kvm_run

    assert vcpu.run() == b.KVM_EXIT_IO
    assert (run.io.direction, run.io.size, run.io.port, run.io.count) == (
        b.KVM_EXIT_IO_OUT, 1, PORT, 1)  # fmt: skip
    assert io_data(vcpu) == b"\x42"

    assert vcpu.run() == b.KVM_EXIT_MMIO
    assert (run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (MMIO_WRITE_ADDR, 2, 1)
    assert bytes(run.mmio.data[:2]) == (0xBEEF).to_bytes(2, "little")

    assert vcpu.run() == b.KVM_EXIT_MMIO
    assert (run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (MMIO_READ_ADDR, 2, 0)
    run.mmio.data[0], run.mmio.data[1] = 0x34, 0x12  # the device's answer

    assert vcpu.run() == b.KVM_EXIT_IO
    assert (run.io.direction, run.io.size, run.io.port) == (b.KVM_EXIT_IO_OUT, 2, PORT)
    assert io_data(vcpu) == (0x1234).to_bytes(2, "little")  # the guest got our answer

    assert vcpu.run() == b.KVM_EXIT_HLT
    assert b.EXIT_REASON_NAMES[run.exit_reason] == "hlt"
    assert vcpu.get_regs().rip == RAM_ADDR + len(GUEST_CODE)


def test_immediate_exit_raises_interrupted_error(guest):
    _, vcpu, ram = guest
    ram[: len(SPIN_CODE)] = SPIN_CODE
    vcpu.kvm_run.immediate_exit = 1
    with pytest.raises(InterruptedError) as info:
        vcpu.run()
    assert info.value.errno == errno.EINTR


def test_signal_interrupts_run(guest):
    _, vcpu, ram = guest
    ram[: len(SPIN_CODE)] = SPIN_CODE
    caught = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: caught.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)  # repeats, in case one is missed
    try:
        with pytest.raises(InterruptedError):
            vcpu.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert caught


def test_stats_exits_grow_after_running(guest):
    vm, vcpu, ram = guest
    ram[: len(GUEST_CODE)] = GUEST_CODE
    with StatsReader(vcpu.stats_fd()) as stats:
        by_name = {d.name: d for d in stats.descriptors}
        assert by_name["exits"].type == "cumulative"
        assert by_name["exits"].size == 1
        assert stats.id.endswith("vcpu-0")
        before = stats.read()["exits"]
        while vcpu.run() != b.KVM_EXIT_HLT:
            pass
        after = stats.read()
        assert after["exits"] > before
        assert any(isinstance(v, list) for v in after.values()) == any(
            d.is_histogram for d in stats.descriptors
        )
    with StatsReader(vm.stats_fd()) as vm_stats:
        assert vm_stats.descriptors
        assert all(isinstance(v, (int, list)) for v in vm_stats.read().values())
