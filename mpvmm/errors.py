"""The one exception hierarchy of mpvmm.

Every failure a user can cause or meet is a subclass of MpvmmError whose
message says what went wrong and, where it can, what to do about it. The CLI
turns them into exit codes in one place (``mpvmm.cli``).
"""


class MpvmmError(Exception):
    """Root of every error mpvmm raises on purpose."""

    exit_code = 1


class UsageError(MpvmmError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class HostLimitError(UsageError):
    """The request does not fit a limit of this host (memory, msg_max, fds)."""


class KvmError(MpvmmError):
    """KVM is missing, refused access, or lacks something mpvmm needs."""


class KvmIoctlError(KvmError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, name: str, errno: int, strerror: str):
        super().__init__(f"{name} failed: {strerror} (errno {errno})")
        self.name = name
        self.errno = errno


class GuestLoadError(UsageError):
    """A guest image could not be loaded (missing, malformed, too large)."""


class DeviceModelError(MpvmmError):
    """The device-model process failed to start, answer, or stay alive."""


class ProtocolError(MpvmmError):
    """A message between the vCPU run loops and the device model is malformed."""

