"""``mpvmm start`` and ``mpvmm ctl`` as separate processes, the way a user runs them."""

import json
import os
import subprocess
import sys
import time

from mpvmm.api.client import request
from mpvmm.errors import MpvmmError

MPVMM = [sys.executable, "-m", "mpvmm"]


# Every VmProcess started, so that a failed test's are killed (tests/conftest.py).
STARTED: list["VmProcess"] = []


class VmProcess:
    """One ``mpvmm start`` with its console, report and (optionally) API socket in ``folder``."""

    def __init__(self, folder, name: str, *args: str, api: bool = True):
        STARTED.append(self)
        self.folder = folder
        self.api_path = str(folder / f"{name}.sock") if api else None
        self.report_path = folder / f"{name}.json"
        command = [*MPVMM, "start", "--no-metrics", "--console", str(folder / f"{name}.console"),
                   "--report", str(self.report_path), *args]
        if api:
            command += ["--api-socket", self.api_path]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout = self.stderr = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.process.poll() is not None:
                raise AssertionError(f"mpvmm exited {self.process.returncode}: {self.process.stderr.read()}")
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.02)

    def api(self, method: str, target: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
        self.wait_for(self.api_path)
        return request(self.api_path, method, target, body, timeout)

    def wait_running(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.api("GET", "/v1/vm")[1]
            except MpvmmError:  # a stale socket at the path, not yet taken over
                status = {"state": "not listening"}
            if status["state"] == "running":
                return status
            assert time.monotonic() < deadline, f"never ran: {status}"
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> int:
        self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode

    def report(self) -> dict:
        return json.loads(self.report_path.read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def kill_leftovers() -> None:
    """Kill every VmProcess a test left running (it failed half-way), so none outlives it."""
    while STARTED:
        STARTED.pop().kill()


def ctl(api_path: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MPVMM, "ctl", "--api-socket", api_path, *args], capture_output=True, text=True,
                          timeout=timeout)


def guest_ops(report_or_status: dict, op: str) -> list[int]:
    """Each vCPU's count of ``op``, from a --report or an API status."""
    vcpus = report_or_status["vcpus"]
    return [(v["guest"]["ops"] if "guest" in v else v["guest_ops"])[op] for v in vcpus]
