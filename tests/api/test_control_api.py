"""The control API of a VM running in this process: every command, every error, for every runner."""

import os
import stat
import time

import pytest

from mpvmm.guest import abi
from mpvmm.snapshot import directory
from mpvmm.vcpu_worker.outcome import Exited
from tests.api.conftest import ApiRun


def exits(api):
    return [vcpu["exits"] for vcpu in api.call("GET", "/v1/vm")[1]["vcpus"]]


@pytest.mark.parametrize("runner", ["native", "python", "process"])
def test_pause_resume_and_stop(runner, tmp_path, no_leaks):
    seen = {}

    def script(api):
        assert stat.S_IMODE(os.stat(api.path).st_mode) == 0o600
        status, body = api.call("GET", "/v1/vm")
        assert status == 200 and body["state"] == "running" and body["runner"] == runner
        assert api.call("PUT", "/v1/vm/pause") == (200, {"state": "paused"})
        frozen = exits(api)
        time.sleep(0.3)
        seen["frozen"] = exits(api) == frozen
        assert {vcpu["loop"] for vcpu in api.call("GET", "/v1/vm")[1]["vcpus"]} == {"paused"}
        assert api.call("PUT", "/v1/vm/pause")[0] == 409
        assert api.call("PUT", "/v1/vm/resume") == (200, {"state": "running"})
        time.sleep(0.3)
        seen["moving"] = all(after > before for after, before in zip(exits(api), frozen))
        assert api.call("PUT", "/v1/vm/resume")[0] == 409
        seen["stopped_at"] = time.monotonic()
        assert api.call("PUT", "/v1/vm/stop") == (200, {"state": "stopping"})

    run = ApiRun(tmp_path, script, cpus=2, workload="pio-null", runner=runner)
    result = run.run()
    assert seen == {"frozen": True, "moving": True, "stopped_at": seen["stopped_at"]}
    assert result.exit_code == 0 and result.status == "stopped through the API"
    assert time.monotonic() - seen["stopped_at"] < 5  # the guest was asked to finish, and did
    assert all(v.outcome == Exited(0) for v in result.vcpus)
    assert not os.path.exists(run.path)


def test_errors_are_json_with_their_status(tmp_path, no_leaks):
    def script(api):
        assert api.call("GET", "/v1/nothing") == (404, {"error": "no such path /v1/nothing (try GET /v1/vm)"})
        assert api.call("GET", "/v1/vm/pause") == (405, {"error": "/v1/vm/pause takes PUT"})
        assert api.call("DELETE", "/v1/vm")[0] == 405
        status, body = api.call("PUT", "/v1/vm/snapshot", {"dir": str(tmp_path / "snap")})
        assert status == 409 and "pause it first" in body["error"]
        assert api.call("PUT", "/v1/vm/snapshot", {})[0] == 400
        assert api.call("PUT", "/v1/vm/migrate", {"url": "ftp:x"})[0] == 400
        assert api.call("PUT", "/v1/vm/migrate", {"url": "unix:/x", "downtime_ms": -1})[0] == 400
        assert api.call("PUT", "/v1/vm/pause")[0] == 200
        status, body = api.call("PUT", "/v1/vm/migrate", {"url": "unix:/nowhere"})
        assert status == 409 and "paused" in body["error"]
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        assert api.call("PUT", "/v1/vm/snapshot", {"dir": str(tmp_path / "full")})[0] == 400
        api.call("PUT", "/v1/vm/stop")

    result = ApiRun(tmp_path, script, cpus=1, workload="demo").run()
    assert result.exit_code == 0


def test_a_body_that_is_not_json_is_400(tmp_path, no_leaks):
    import socket

    def script(api):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(api.path)
            sock.sendall(b"PUT /v1/vm/snapshot HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope")
            answer = sock.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 400") and b'"error": "the body is not JSON' in answer
        api.call("PUT", "/v1/vm/stop")

    assert ApiRun(tmp_path, script, workload="demo").run().exit_code == 0


def test_the_process_runner_pauses_but_cannot_snapshot(tmp_path, no_leaks):
    def script(api):
        assert api.call("PUT", "/v1/vm/pause")[0] == 200
        status, body = api.call("PUT", "/v1/vm/snapshot", {"dir": str(tmp_path / "snap")})
        assert status == 409 and "--runner process" in body["error"]
        api.call("PUT", "/v1/vm/stop")

    assert ApiRun(tmp_path, script, cpus=2, workload="pio-null", runner="process").run().exit_code == 0
    assert not (tmp_path / "snap").exists()


@pytest.mark.parametrize("runner", ["native", "python"])
def test_a_snapshot_of_a_paused_vm(runner, tmp_path, no_leaks):
    target = tmp_path / "snap"
    seen = {}

    def script(api):
        time.sleep(0.2)
        api.call("PUT", "/v1/vm/pause")
        seen["counts"] = api.call("GET", "/v1/vm")[1]
        status, body = api.call("PUT", "/v1/vm/snapshot", {"dir": str(target)})
        assert status == 200, body
        seen["snapshot"] = body["snapshot"]
        assert api.call("GET", "/v1/vm")[1]["state"] == "paused"  # a snapshot does not resume
        api.call("PUT", "/v1/vm/stop")

    result = ApiRun(tmp_path, script, cpus=2, workload="atomics", runner=runner).run()
    assert result.exit_code == 0
    saved = directory.read(str(target))
    assert saved.state.machine["cpus"] == 2 and saved.state.machine["guest"]["workload"] == "atomics"
    assert saved.state.machine["guest"]["params"]["abi_version"] == abi.ABI_VERSION
    assert [vcpu.index for vcpu in saved.state.vcpus] == [0, 1]
    assert {"com1", "testdev-pio", "testdev-mmio", "port80", "pci-config"} == set(saved.state.devices)
    memory = target / directory.MEMORY_FILE
    assert memory.stat().st_size == 64 << 20
    assert memory.stat().st_blocks * 512 < 1 << 20  # sparse: the guest touched a few pages
    assert seen["snapshot"]["memory_written_bytes"] < 1 << 20
    saved.close()


def test_clients_that_misbehave_stall_nothing(tmp_path, no_leaks):
    """Half requests, garbage and a trickle: the run ends on time and the API still answers."""
    import socket

    def script(api):
        for data in (b"PUT /v1/vm/pau", b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"PUT /v1/vm/pause HTTP/1.1\r\nCon"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(api.path)
                sock.sendall(data)
        trickle = socket.socket(socket.AF_UNIX)
        trickle.connect(api.path)
        for byte in b"GET /v1/vm HTTP/1.1\r\n":
            trickle.send(bytes([byte]))
            time.sleep(0.02)
        assert api.call("GET", "/v1/vm")[1]["state"] == "running"
        trickle.close()

    started = time.monotonic()
    result = ApiRun(tmp_path, script, cpus=1, workload="pio-null", seconds=1.5).run()
    assert result.exit_code == 0 and result.status == "time limit reached"
    assert time.monotonic() - started < 8
