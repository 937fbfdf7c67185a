"""What the control API's commands do to a running VM, on the run's main thread.

The API's server thread queues a command (api/server.py); the wait loop
takes it and calls ``VmControl.execute``, which does it and answers the
command's future: a dict for the client, or an ApiError saying why not
(409 for the wrong state, 500 for a failure). A command can end the run:
``stop``, and a ``migrate`` that succeeded. ``status`` is read on the
server thread from what the VM shows anyway, so it answers even while a
migration holds the main thread.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from mpvmm.api.server import ApiError, BadRequest, Command, Conflict, Failed
from mpvmm.errors import MpvmmError, SnapshotError
from mpvmm.migration.source import Migration, MigrationOutcomeUnknown
from mpvmm.snapshot import directory
from mpvmm.snapshot.machine_state import MachineState
from mpvmm.supervisor.ending import ApiStop, MigratedAway, RunEnding
from mpvmm.vcpu_worker.stats_page import WorkerState

PAUSE_TIMEOUT_SECONDS = 5.0


class VmState(enum.Enum):
    STARTING = "starting"  # being built, restored, or still arriving
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    STOPPING = "stopping"


class VmControl:
    """The state the API sees and changes; ``vm`` is the RunningVm once it is built."""

    def __init__(self):
        self.vm = None
        self.state = VmState.STARTING
        self.started_at: float | None = None
        self.migration: Migration | None = None  # the one in progress, or the last
        self.migration_result: dict | None = None

    def running(self, vm) -> None:
        self.vm, self.state, self.started_at = vm, VmState.RUNNING, time.monotonic()

    # --- Commands, on the main thread. ---

    def execute(self, command: Command, abort: Callable[[], str | None]) -> RunEnding | None:
        """Do ``command``, answer it; the ending it brings, if it ends the run."""
        try:
            result, ending = self._do(command, abort)
        except ApiError as err:
            command.future.set_exception(err)
            return None
        except MpvmmError as err:
            command.future.set_exception(Failed(str(err)))
            return None
        except Exception as err:  # a bug in a command must not take the VM down with it
            command.future.set_exception(Failed(f"internal error in {command.name}: {type(err).__name__}: {err}"))
            return None
        command.future.set_result(result)
        return ending

    def _do(self, command: Command, abort) -> tuple[dict, RunEnding | None]:
        if self.state is VmState.STARTING:
            raise Conflict("the VM is not running yet")
        match command.name:
            case "pause":
                self._expect(VmState.RUNNING, "pause")
                self.vm.vcpus.pause()
                if not self.vm.vcpus.wait_paused(PAUSE_TIMEOUT_SECONDS):
                    self.vm.vcpus.resume()
                    raise Failed(f"the vCPUs did not pause within {PAUSE_TIMEOUT_SECONDS:g} s; resumed")
                self.state = VmState.PAUSED
            case "resume":
                self._expect(VmState.PAUSED, "resume")
                self.vm.vcpus.resume()
                self.state = VmState.RUNNING
            case "stop":
                self.state = VmState.STOPPING
                return {"state": self.state.value}, ApiStop()
            case "snapshot":
                return self._snapshot(command.args["dir"]), None
            case "migrate":
                return self._migrate(command.args, abort)
        return {"state": self.state.value}, None

    def _expect(self, state: VmState, action: str) -> None:
        if self.state is not state:
            raise Conflict(f"cannot {action} a VM that is {self.state.value}")

    def _machine_state_check(self, action: str) -> None:
        if not self.vm.host.has_machine_state:
            raise Conflict(f"cannot {action} with --runner {self.vm.config.runner}: each vCPU has a VM of its "
                           "own, so there is no one machine state (use --runner native or python)")

    def _snapshot(self, path: str) -> dict:
        self._machine_state_check("snapshot")
        if self.state is not VmState.PAUSED:
            raise Conflict(f"cannot snapshot a VM that is {self.state.value}: pause it first")
        try:
            directory.check_target(path)
        except SnapshotError as err:
            raise BadRequest(str(err)) from None
        state = MachineState.capture(self.vm)
        return {"state": self.state.value, "snapshot": directory.write(path, state, self.vm.memory)}

    def _migrate(self, args: dict, abort) -> tuple[dict, RunEnding | None]:
        self._machine_state_check("migrate")
        if len(self.vm.virtio):
            # A disk is a file on this host: the destination would need the same file, in step.
            raise Conflict(f"cannot migrate a VM with virtio devices "
                           f"({', '.join(device.spec.name for device in self.vm.virtio.devices)}): not supported yet")
        self._expect(VmState.RUNNING, "migrate")
        self.state = VmState.MIGRATING
        self.migration = Migration(self.vm, args["address"], args["downtime_ms"], args["timeout_s"], abort,
                                   args["max_bandwidth_mib_s"])
        try:
            report = self.migration.run()
        except MigrationOutcomeUnknown as err:
            self.state = VmState.PAUSED
            raise Failed(str(err)) from None
        except MpvmmError as err:
            self.state = VmState.RUNNING
            raise Failed(str(err)) from None
        self.state = VmState.STOPPING
        self.migration_result = report
        return {"state": "migrated", "migration": report}, MigratedAway(str(args["address"]), report)

    # --- The status, on the API's thread (and the metrics'). ---

    def migration_report(self) -> dict | None:
        """How the VM is leaving or left (source), or how it arrived (destination); None if it never moved."""
        if self.migration is not None:
            return self.migration_result or self.migration.progress()
        return self.vm.guest.arrival if self.vm is not None else None

    def status(self) -> dict:
        vm = self.vm
        status = {"state": self.state.value, "migration": self.migration_report()}
        if vm is None:
            return status
        vcpus = []
        for runner in vm.vcpus:
            counts = vm.guest.counts(runner.index)
            vcpus.append({"index": runner.index, "loop": WorkerState(runner.stats.state).name.lower(),
                          "exits": int(runner.stats.runs),
                          "guest_ops": None if counts is None else counts.ops})
        status.update({"cpus": vm.config.cpus, "memory": vm.config.memory, "runner": vm.config.runner,
                       "workload": vm.config.workload, "seconds": time.monotonic() - self.started_at,
                       "atomic_total": vm.guest.atomic_total(), "vcpus": vcpus})
        return status
