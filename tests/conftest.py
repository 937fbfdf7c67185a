"""Shared fixtures: KVM must be there, and nothing may leak."""

import os
import re
import subprocess

import pytest

from tests.vm_process import kill_leftovers

MQUEUE_DIR = "/dev/mqueue"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # The message-queue filesystem makes leaked queues visible; mount it if
    # we can (root in CI), as most distributions do at boot.
    if not os.path.ismount(MQUEUE_DIR) and os.geteuid() == 0:
        os.makedirs(MQUEUE_DIR, exist_ok=True)
        subprocess.run(["mount", "-t", "mqueue", "none", MQUEUE_DIR], check=False)


@pytest.fixture(scope="session")
def kvm_available():
    """KVM tests fail, not skip, without /dev/kvm: a silent skip would hide it."""
    if not os.path.exists("/dev/kvm"):
        pytest.fail("/dev/kvm is missing: these tests need KVM (load kvm_intel/kvm_amd)")


@pytest.fixture(scope="session")
def test_cache():
    """Debian's kernels and busybox, downloaded once by scripts/fetch-test-kernel.sh.

    Into ``$MPVMM_TEST_CACHE`` (default ~/.cache/mpvmm-test). Like the KVM
    tests, the tests that need them fail rather than skip when they cannot get them.
    """
    cache = os.environ.get("MPVMM_TEST_CACHE", os.path.expanduser("~/.cache/mpvmm-test"))
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fetch-test-kernel.sh"), cache],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"cannot fetch Debian's kernels for the boot tests: {result.stderr.strip()[-500:]}")
    return cache


def ipc_objects() -> set[str]:
    """mpvmm shared memory objects and message queues that are leaks or ours.

    Names carry their creator's pid (/mpvmm-<pid>-<random>-<role>). An object
    whose creator is this process, or is gone, counts; one whose creator is
    another live process (a run beside ours on the same host) is that run's.
    """
    names = set()
    for folder in ("/dev/shm", MQUEUE_DIR):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if not name.startswith("mpvmm-"):
                continue
            # Device-model tests name theirs /mpvmm-test-<pid>-...
            match = re.match(r"mpvmm-(?:test-)?(\d+)-", name)
            creator = int(match.group(1)) if match else None
            if creator is None or creator == os.getpid() or not os.path.exists(f"/proc/{creator}"):
                names.add(f"{folder}/{name}")
    return names


def _parent(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def device_model_processes() -> set[int]:
    """Device models that are ours (our children) or nobody's (orphans, ppid 1).

    Device models of other test runs on the same host belong to neither.
    """
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"mpvmm.devicemodel" in f.read() and _parent(pid) in (os.getpid(), 1):
                        pids.add(int(pid))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks(kvm_available):
    """Fails the test if it left an IPC object, a device model or an fd behind."""
    objects, processes, fds = ipc_objects(), device_model_processes(), open_fds()
    yield
    kill_leftovers()  # the mpvmm processes a failed test started (a passing one ended them)
    assert ipc_objects() - objects == set(), "shared memory or message queues left behind"
    assert device_model_processes() - processes == set(), "device-model process left running"
    assert open_fds() <= fds, "file descriptors leaked"


def thread_names(pid="self") -> list[str]:
    """The kernel names (comm) of every thread of a process, as `ps -eLf` shows them."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names
