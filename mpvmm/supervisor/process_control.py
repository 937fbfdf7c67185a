"""A helper process the supervisor starts and talks to over a msgpack control socket.

The virtio device processes (virtio_devices.py) are started as the device
model is (device_model_client.py): ``python -m <module> <fd>`` with one end
of a socketpair and the descriptors it needs, the stop signals blocked
across the fork (they are the supervisor's to handle), ``configure`` sent
and ``ready`` awaited. Requests and answers are msgpack maps, one at a time.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack

from mpvmm.errors import DeviceModelError
from mpvmm.stop_signals import STOP_SIGNALS
from mpvmm.supervisor.device_model_client import REPLY_TIMEOUT_SECONDS, START_TIMEOUT_SECONDS, _stopped


class ControlledProcess:
    """``python -m {module}``, named ``name`` in errors; ``start`` configures it."""

    module: str
    process: subprocess.Popen | None = None
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
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.process = subprocess.Popen([sys.executable, "-m", self.module, str(child.fileno()), self.name],
                                            pass_fds=(child.fileno(), *self._fds), stdin=subprocess.DEVNULL)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
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
            self._control.settimeout(min(left, 0.1))
            try:
                data = self._control.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                raise DeviceModelError(f"{self.name} is gone: {err.strerror}") from err
            if not data:
                raise DeviceModelError(f"{self.name} exited ({self.describe_exit()})")
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

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stopped(self) -> bool:
        return self.alive() and _stopped(self.process.pid)

    def describe_exit(self) -> str:
        if self.process is None:
            return "never started"
        code = self.process.poll()
        if code is None:
            return "stopped" if _stopped(self.process.pid) else "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def close(self) -> None:
        """Kill it if still running and close the control socket. Idempotent."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._control is not None:
            self._control.close()
            self._control = None
