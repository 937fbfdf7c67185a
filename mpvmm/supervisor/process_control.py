"""A helper process the supervisor starts and talks to over a msgpack control socket.

The virtio device processes (virtio_devices.py) are started as the device
model is (child_process.py): ``python -m <module> <fd>`` with one end
of a socketpair and the descriptors it needs, the stop signals blocked
across the fork (they are the supervisor's to handle), ``configure`` sent
and ``ready`` awaited. Requests and answers are msgpack maps, one at a time.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import msgpack

from mpvmm.errors import DeviceModelError
from mpvmm.supervisor.child_process import ChildProcess, receive_some, spawn
from mpvmm.supervisor.device_model_client import REPLY_TIMEOUT_SECONDS

# Its ready answer comes after Python's start-up and imports: a second or
# two on a quiet host, more than 15 s measured in a nested-KVM guest whose
# files come over 9p while the host was loaded. Not a hang detector: a
# process that died is noticed at once.
START_TIMEOUT_SECONDS = 60.0


class ControlledProcess(ChildProcess):
    """``python -m {module}``, named ``name`` in errors; ``start`` configures it."""

    module: str
    _control: socket.socket | None = None

    def __init__(self, name: str, fds: list[int]):
        self.name = name
        self._fds = fds  # inherited by the process
        self._unpacker = msgpack.Unpacker(raw=False)
        self._lock = threading.Lock()
        self.pid = 0

    def start(self, configure: dict) -> dict:
        """Spawn the process, send ``configure``; its ``ready`` answer (DeviceModelError otherwise)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control = parent
        try:
            self.process = spawn(self.module, [str(child.fileno()), self.name], (child.fileno(), *self._fds))
        finally:
            child.close()
        reply = self.request(configure, START_TIMEOUT_SECONDS)
        if reply.get("op") != "ready":
            raise DeviceModelError(f"{self.name} failed to start: {reply.get('message', reply)}")
        self.pid = reply.get("pid", self.process.pid)
        return reply

    def request(self, message: dict, timeout: float = REPLY_TIMEOUT_SECONDS) -> dict:
        """Send ``message``, return the answer; one request at a time (the metrics' scrapes and the
        API's snapshots come from threads of their own)."""
        with self._lock:
            return self._request(message, timeout)

    def _request(self, message: dict, timeout: float) -> dict:
        try:
            self._control.sendall(msgpack.packb(message))
        except OSError as err:
            raise DeviceModelError(f"{self.name} is gone ({self.describe_exit()}): {err.strerror}") from err
        deadline = time.monotonic() + timeout
        while True:
            for answer in self._unpacker:
                if isinstance(answer, dict):
                    return answer
            left = deadline - time.monotonic()
            if left <= 0 or self.stopped():
                raise DeviceModelError(f"{self.name} did not answer ({self.describe_exit()})")
            data = receive_some(self._control, min(left, 0.1), self.name, self.describe_exit)
            if data is not None:
                self._unpacker.feed(data)

    def shutdown(self) -> dict:
        """Ask it to finish and exit; its last answer."""
        reply = self.request({"op": "shutdown"})
        try:
            self.process.wait(REPLY_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return reply

    def close(self) -> None:
        """Kill it if still running and close the control socket. Idempotent."""
        self.kill()
        if self._control is not None:
            self._control.close()
            self._control = None
