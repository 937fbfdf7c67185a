"""A VM run in this process with its control API, driven from a thread as a client would."""

import threading

from mpvmm.api.client import request
from mpvmm.supervisor.run import RunConfig, Supervisor


class ApiRun:
    """Runs ``config`` with an API socket at ``path``; ``script(api)`` talks to it from a thread."""

    def __init__(self, tmp_path, script, **config):
        self.path = str(tmp_path / "api.sock")
        self.script = script
        self.error: BaseException | None = None
        self.config = RunConfig(api_socket=self.path, console=str(tmp_path / "console"),
                                **{"memory": 64 << 20, "seconds": 10.0, **config})
        self.vm = None

    def call(self, method: str, target: str, body: dict | None = None) -> tuple[int, dict]:
        return request(self.path, method, target, body, timeout=30)

    def _started(self, vm) -> None:
        self.vm = vm
        self._thread = threading.Thread(target=self._drive)
        self._thread.start()

    def _drive(self) -> None:
        try:
            self.script(self)
        except BaseException as err:  # re-raised on the test's thread
            self.error = err
            self.call("PUT", "/v1/vm/stop")

    def run(self):
        result = Supervisor(self.config, on_started=self._started).run()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return result
