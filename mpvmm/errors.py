"""The one exception hierarchy of mpvmm.

Every failure a user can cause or meet is a subclass of MpvmmError whose
message says what went wrong and, where it can, what to do about it. The CLI
turns them into exit codes in one place (``mpvmm.cli``).
"""

import signal


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



class StateError(MpvmmError):
    """A saved machine state (a snapshot's, a migration's) is malformed or does not fit this host."""


class SnapshotError(UsageError):
    """A snapshot cannot be written or restored as asked: another version, truncated, wrong size, corrupt."""


class MigrationError(MpvmmError):
    """A live migration failed: the peer went away, refused, or sent a corrupt stream."""


class Interrupted(MpvmmError):
    """A stop signal arrived before the VM ran (SIGINT while waiting for an incoming VM): exit 128+N."""

    def __init__(self, signum: int, what: str):
        super().__init__(f"{what}: stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum
