"""mpvmm: a KVM virtual machine monitor in Python built for many vCPUs."""

__version__ = "0.1.0"
