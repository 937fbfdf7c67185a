"""The device model's sandbox, attacked from inside a real sandboxed device model.

``sandbox_probe`` runs the device model's own ``configure`` (guest RAM,
queues, privileges dropped, Landlock, the seccomp allow-list) and then,
instead of serving a guest, attacks its host. Every attempt must fail, and
its effect must be absent from the host: the victim process still runs
with its limits, the files are unchanged. The same probe without a sandbox
shows that the attempts would succeed, so these tests can fail; one layer
at a time shows what each layer stops on its own.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from mpvmm.devicemodel import landlock
from tests.devicemodel.test_process import Harness

ISSUE_ATTEMPTS = (  # what an adversarial pass did with the earlier, deny-list sandbox
    "tgkill another process",
    "prlimit64 another process",
    "write a root-owned file",
    "write a sysctl",
    "open /proc/<other>/mem read-write",
    "io_uring_setup",
)
NEXT_ATTEMPTS = (
    "create a file in a world-writable folder",
    "read a file",
    "signal the parent",
    "ptrace another process",
    "process_vm_writev another process",
    "pidfd_open another process",
    "execve",
    "fork",
    "socket",
    "memfd_create",
    "unshare a user namespace",
    "setuid 0",
    "map memory executable",
    "make guest RAM writable",
)
IS_ROOT = os.geteuid() == 0
NOBODY = 65534
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
QUIET = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


@pytest.fixture(scope="module")
def targets():
    """A victim process of the sandbox's own uid (the hardest case), a root-owned file, an open folder."""
    folder = tempfile.mkdtemp(prefix="mpvmm-sandbox-")
    os.chmod(folder, 0o755)  # reachable by the sandbox's uid
    open_dir = os.path.join(folder, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o1777)
    # A victim of the probe's own uid: the sandbox's (nobody) where it drops to it, else ours.
    victims = {"own": subprocess.Popen(["sleep", "600"], **QUIET)}
    if IS_ROOT:
        victims["nobody"] = subprocess.Popen(["sleep", "600"], user=NOBODY, group=NOBODY, extra_groups=[], **QUIET)
    yield {"victims": {name: victim.pid for name, victim in victims.items()},
           "root_file": os.path.join(folder, "root-owned"), "open_dir": open_dir, "read_file": "/etc/passwd"}
    for victim in victims.values():
        victim.kill()
        victim.wait()
    shutil.rmtree(folder)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def guest_ram_mapping(pid: int, size: int) -> tuple[int, str]:
    """(address, permissions) of the shared mapping of ``size`` bytes in ``pid``: guest RAM."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(value, 16) for value in fields[0].split("-"))
            if end - start == size and fields[1].endswith("s"):
                return start, fields[1]
    raise AssertionError("guest RAM is not mapped")


def open_files_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return next(line for line in f if line.startswith("Max open files"))


def stopped_or_stopping(pid: int) -> bool:
    """Stopped, or with a SIGSTOP pending that the scheduler has not let it act on yet."""
    status = proc_status(pid)
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return status["State"].startswith("T") or bool(pending & 1 << (signal.SIGSTOP - 1))


def run_probe(targets: dict, layers: str, start_as: int | None = None) -> dict:
    """Start the probe with ``layers`` of the sandbox, let it attack, and return what it saw and did."""
    drops_uid = IS_ROOT and (layers in ("all", "privileges") or start_as is not None)
    targets = {**targets, "victim": targets["victims"]["nobody" if drops_uid else "own"], "start_as": start_as}
    with open(targets["root_file"], "w") as f:
        f.write("original\n")
    os.chmod(targets["root_file"], 0o644)
    limit_before = open_files_limit(targets["victim"])
    harness = Harness()
    try:
        if start_as is not None:  # guest RAM and the queues are that user's own, as its supervisor's would be
            os.fchown(harness.shm.fd, start_as, start_as)
            for name in harness.req_names + harness.rep_names:
                os.chown(f"/dev/mqueue{name}", start_as, start_as)
        harness.start(module="tests.devicemodel.sandbox_probe", args=(json.dumps({**targets, "layers": layers}),))
        ready = harness.configure()
        assert ready["op"] == "ready", ready
        status = proc_status(harness.proc.pid)
        address, permissions = guest_ram_mapping(harness.proc.pid, 1 << 20)
        harness.send({"op": "go", "ram_address": address})
        answer = harness.recv()
        assert harness.proc.wait(10) == 0
    finally:
        harness.close()
    victim_stopped = stopped_or_stopping(targets["victim"])
    os.kill(targets["victim"], signal.SIGCONT)  # in case an unconfined run stopped it
    with open(targets["root_file"]) as f:
        root_file = f.read()
    planted = os.listdir(targets["open_dir"])
    for name in planted:
        os.unlink(os.path.join(targets["open_dir"], name))
    return {"ready": ready, "status": status, "ram_permissions": permissions, "results": answer["results"],
            "victim_stopped": victim_stopped, "victim_limit_changed": open_files_limit(targets["victim"]) != limit_before,
            "root_file": root_file, "planted": planted}


@pytest.fixture(scope="module")
def sandboxed(targets):
    return run_probe(targets, "all")


@pytest.mark.parametrize("attempt", ISSUE_ATTEMPTS + NEXT_ATTEMPTS)
def test_attempt_fails_inside_the_sandbox(sandboxed, attempt):
    assert sandboxed["results"][attempt] == "EPERM"  # the seccomp filter's answer


def test_attempts_leave_no_trace_on_the_host(sandboxed):
    assert not sandboxed["victim_stopped"]
    assert not sandboxed["victim_limit_changed"]
    assert sandboxed["root_file"] == "original\n"
    assert sandboxed["planted"] == []


def test_sandboxed_process_has_no_privileges(sandboxed):
    status = sandboxed["status"]
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter
    for capability_set in CAPABILITY_SETS:
        assert int(status[capability_set], 16) == 0, capability_set
    if IS_ROOT:
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert status["Gid"].split() == [str(NOBODY)] * 4
        assert status["Groups"].strip() == ""
    ready = sandboxed["ready"]["sandbox"]
    assert ready["uid"] == (NOBODY if IS_ROOT else os.geteuid())
    assert ready["landlock_abi"] == landlock.abi_version()


def test_guest_ram_is_mapped_read_only(sandboxed):
    assert sandboxed["ram_permissions"] == "r--s"


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start the probe as another user")
def test_without_root_the_uid_stays_and_the_rest_applies(targets):
    """A device model started by an unprivileged user cannot change its uid; Landlock and seccomp still apply."""
    unprivileged = run_probe(targets, "all", start_as=NOBODY)
    results = unprivileged["results"]
    assert {attempt: results[attempt] for attempt in ISSUE_ATTEMPTS + NEXT_ATTEMPTS} == dict.fromkeys(
        ISSUE_ATTEMPTS + NEXT_ATTEMPTS, "EPERM")
    sandbox = unprivileged["ready"]["sandbox"]
    assert sandbox["uid"] == NOBODY and sandbox["notes"][0] == f"not started as root: keeps uid {NOBODY} and its supplementary groups"
    status = unprivileged["status"]
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert [int(status[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")] == [0, 0, 0, 0]
    assert not unprivileged["victim_stopped"] and unprivileged["root_file"] == "original\n"


@pytest.mark.skipif(not IS_ROOT, reason="the attempts succeed unconfined only for root")
def test_the_attempts_succeed_without_the_sandbox(targets):
    """The probe with no sandbox at all: what the tests above would see if it failed."""
    unconfined = run_probe(targets, "none")
    assert {attempt: unconfined["results"][attempt] for attempt in ISSUE_ATTEMPTS} == dict.fromkeys(ISSUE_ATTEMPTS, "ok")
    assert unconfined["victim_stopped"] and unconfined["victim_limit_changed"]
    assert unconfined["root_file"] == "owned\n"
    assert unconfined["ram_permissions"] == "r--s"  # read-only whatever the sandbox: a configure choice


@pytest.mark.skipif(not IS_ROOT, reason="only root can change its uid")
def test_dropping_privileges_alone_stops_root_only_writes(targets):
    dropped = run_probe(targets, "privileges")
    results = dropped["results"]
    for attempt in ("write a root-owned file", "write a sysctl"):
        assert results[attempt] == "EACCES", attempt
    assert results["setuid 0"] == "EPERM"
    # The read-only fd: no mprotect can make guest RAM writable again.
    assert results["make guest RAM writable"] == "EACCES"
    assert dropped["root_file"] == "original\n"
    assert int(dropped["status"]["CapBnd"], 16) == 0


@pytest.mark.skipif(landlock.abi_version() == 0, reason="this kernel has no Landlock")
def test_landlock_alone_stops_every_file_and_foreign_signal(targets):
    results = run_probe(targets, "landlock")["results"]
    for attempt in ("write a root-owned file", "write a sysctl", "open /proc/<other>/mem read-write",
                    "create a file in a world-writable folder", "read a file"):
        assert results[attempt] == "EACCES", attempt
    if landlock.abi_version() >= landlock.ABI_SCOPED_SIGNALS:
        assert results["tgkill another process"] == "EPERM"
        assert results["signal the parent"] == "EPERM"


def test_seccomp_alone_stops_every_attempt(targets):
    results = run_probe(targets, "seccomp")["results"]
    assert {attempt: results[attempt] for attempt in ISSUE_ATTEMPTS + NEXT_ATTEMPTS} == dict.fromkeys(
        ISSUE_ATTEMPTS + NEXT_ATTEMPTS, "EPERM")


def test_guest_ram_can_be_mapped_writable_when_asked():
    """For device processes that write guest memory (virtio, later): a configure field."""
    harness = Harness()
    try:
        harness.start()
        assert harness.configure(ram_writable=True)["op"] == "ready"
        assert guest_ram_mapping(harness.proc.pid, 1 << 20)[1] == "rw-s"
        harness.send({"op": "shutdown"})
        assert harness.recv()["op"] == "bye"
        assert harness.proc.wait(10) == 0
    finally:
        harness.close()


@pytest.mark.skipif(landlock.abi_version() == 0, reason="this kernel has no Landlock")
def test_every_landlock_abi_up_to_the_kernels_builds_a_ruleset_it_accepts():
    """Each older ABI's ruleset (rights and struct size) is one this kernel accepts,
    and the sizes and rights follow linux/landlock.h's history."""
    for abi in range(1, landlock.abi_version() + 1):
        os.close(landlock.create_ruleset(abi))
    known = landlock.ACCESS_FS_BY_ABI
    assert landlock._ruleset_for(1)[0].handled_access_fs == known[1] and landlock._ruleset_for(1)[1] == 8
    assert landlock._ruleset_for(4)[1] == 16 and landlock._ruleset_for(4)[0].scoped == 0
    assert landlock._ruleset_for(6)[0].scoped == landlock.SCOPE_SIGNAL | landlock.SCOPE_ABSTRACT_UNIX_SOCKET
