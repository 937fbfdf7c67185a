"""The KVM ioctl request numbers mpvmm uses, computed as linux/kvm.h computes them.

Grouped by the file descriptor they are issued on (api.rst: "system", "vm"
and "vcpu" ioctls). tests/kvm/test_bindings.py checks each against C.
"""

from ctypes import c_uint64

from mpvmm.kvm import bindings as b
from mpvmm.kvm.ioctl import IO, IOR, IOW, IOWR, KVMIO

# --- /dev/kvm ---
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)  # returns a VM fd
KVM_GET_MSR_INDEX_LIST = IOWR(KVMIO, 0x02, b.kvm_msr_list)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)  # also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)  # in bytes
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, b.kvm_cpuid2)

# --- VM fd ---
KVM_CREATE_VCPU = IO(KVMIO, 0x41)  # returns a vCPU fd
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, b.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
KVM_IRQ_LINE = IOW(KVMIO, 0x61, b.kvm_irq_level)
KVM_IRQFD = IOW(KVMIO, 0x76, b.kvm_irqfd)
KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, b.kvm_pit_config)
KVM_IOEVENTFD = IOW(KVMIO, 0x79, b.kvm_ioeventfd)
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, b.kvm_enable_cap)  # also valid on a vCPU fd
KVM_GET_STATS_FD = IO(KVMIO, 0xCE)  # also valid on a vCPU fd

# --- vCPU fd ---
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, b.kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, b.kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, b.kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, b.kvm_sregs)
KVM_GET_MSRS = IOWR(KVMIO, 0x88, b.kvm_msrs)
KVM_SET_MSRS = IOW(KVMIO, 0x89, b.kvm_msrs)
KVM_GET_FPU = IOR(KVMIO, 0x8C, b.kvm_fpu)
KVM_SET_FPU = IOW(KVMIO, 0x8D, b.kvm_fpu)
KVM_GET_LAPIC = IOR(KVMIO, 0x8E, b.kvm_lapic_state)
KVM_SET_LAPIC = IOW(KVMIO, 0x8F, b.kvm_lapic_state)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, b.kvm_cpuid2)
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, b.kvm_mp_state)
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, b.kvm_mp_state)
