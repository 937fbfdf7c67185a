"""Shared fixtures: KVM must be there, nothing may leak, and Linux to boot (directly or nested)."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.linux.initramfs import init_script, write_initramfs
from tests.nested.l1 import L1, Assets
from tests.nested.l2 import NestedLinux
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
    """Device models and virtio device processes that are ours (our children) or nobody's (orphans, ppid 1) started by our Python.

    Device models of other test runs on the same host belong to neither: not
    our children, and an orphan of theirs (one that outlives its killed
    supervisor for the moment it takes to notice) runs another checkout's
    interpreter. In CI, one checkout, every orphan counts.
    """
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                if (b"mpvmm.devicemodel" in argv or b"mpvmm.virtio_device" in argv) and (_parent(pid) == os.getpid() or (
                        _parent(pid) == 1 and argv[0] == os.fsencode(sys.executable))):
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


@pytest.fixture
def spawn(no_leaks):
    """``subprocess.Popen`` whose processes cannot outlive the test, nor its pipes.

    A test that fails half-way leaves its Popen referenced by the traceback
    pytest keeps; its pipes would stay open until some later collection and
    change a later test's count of open fds. At teardown every process is
    killed if still running and reaped, and every pipe closed, before
    ``no_leaks`` looks.
    """
    started: list[subprocess.Popen] = []

    def popen(*args, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(*args, **kwargs)
        started.append(process)
        return process

    yield popen
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


# Linux to boot: Debian 12's kernels and busybox initramfs images, for the
# boot tests, the nested tests and the soak; one L1 per test module for the
# nested boots (``nested_linux``, marker ``nested_kvm``: docs/linux.md says
# why one per module).


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


@pytest.fixture(scope="session")
def debian_kernel(test_cache):
    """Debian's cloud kernel: ACPI, no MP-table parser."""
    (kernel,) = glob.glob(os.path.join(test_cache, "x-kernel", "boot", "vmlinuz-*"))
    return kernel


@pytest.fixture(scope="session")
def generic_kernel(test_cache):
    """Debian's generic kernel: XZ payload, with an MP-table parser."""
    (kernel,) = glob.glob(os.path.join(test_cache, "x-generic", "boot", "vmlinuz-*"))
    return kernel


@pytest.fixture(scope="session")
def busybox_initramfs(test_cache):
    return write_initramfs(os.path.join(test_cache, "x-busybox", "bin", "busybox"),
                           os.path.join(test_cache, "initramfs.cpio.gz"))


@pytest.fixture(scope="session")
def init_images(test_cache, tmp_path_factory):
    """A busybox initramfs per way for init to end: ``init_images["reboot"]`` is its path."""
    folder = tmp_path_factory.mktemp("initramfs")
    busybox = os.path.join(test_cache, "x-busybox", "bin", "busybox")
    return {ending: write_initramfs(busybox, str(folder / f"{ending}.cpio.gz"), init_script(ending))
            for ending in ("poweroff", "reboot", "panic", "shell")}


@pytest.fixture(scope="module")
def nested_linux(test_cache, tmp_path_factory):
    """One L1 (QEMU TCG with emulated SVM) for the whole test module, powered off after it."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: install Debian's qemu-system-x86 (scripts/test.sh does)")
    l1 = L1(Assets.from_cache(test_cache), str(tmp_path_factory.mktemp("l1")))
    try:
        yield NestedLinux(l1)
    finally:
        l1.close()
