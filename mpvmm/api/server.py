"""The routes of ``mpvmm start --api-socket PATH``: JSON in, JSON out, errors with their status codes.

    GET  /v1/vm            the VM's state and counts (answered at once)
    PUT  /v1/vm/pause      pause every vCPU
    PUT  /v1/vm/resume     resume them
    PUT  /v1/vm/stop       end the run as --seconds would
    PUT  /v1/vm/snapshot   {"dir": PATH}: save the paused VM (docs/snapshot.md)
    PUT  /v1/vm/migrate    {"url": "tcp:HOST:PORT" | "unix:PATH", "downtime_ms": 300, "timeout_s": 60,
                            "max_bandwidth_mib_s": null}

Every error is ``{"error": "..."}``: 400 for a body or field that is wrong,
404 for an unknown path, 405 for a method a path does not take, 409 when
the VM is in the wrong state for it (a snapshot of a running VM, a pause of
a paused one), 500 when the operation failed. Everything but the status is
a ``Command`` the run's main thread takes from ``next_command`` (it owns
the VM), so the server thread never waits on the VM.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from mpvmm.http_server import HttpServer, Request, Response
from mpvmm.api.unix_socket import PrivateUnixSocket
from mpvmm.errors import UsageError
from mpvmm.migration.address import parse as parse_address

DEFAULT_DOWNTIME_MS = 300
DEFAULT_MIGRATION_TIMEOUT_S = 60.0
# What a migrate request may ask (`mpvmm ctl migrate` checks the same before sending).
DOWNTIME_MS_RANGE = (1, 60_000)
MIGRATION_TIMEOUT_S_RANGE = (0.1, 3600)
MAX_BANDWIDTH_MIB_S_RANGE = (0.01, 1e6)
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           500: "Internal Server Error", 503: "Service Unavailable"}


class ApiError(Exception):
    """A command that cannot be done: the message goes to the client with ``status``."""

    status = 500


class BadRequest(ApiError):
    status = 400


class Conflict(ApiError):
    """The VM is in the wrong state for the command."""

    status = 409


class Failed(ApiError):
    """The command was tried and failed (the VM is as the message says)."""

    status = 500


@dataclass
class Command:
    """One thing for the main thread to do; its result (a dict) or ApiError goes to ``future``."""

    name: str  # pause, resume, stop, snapshot, migrate
    args: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)


def json_response(status: int, body: dict) -> Response:
    return Response(status, REASONS.get(status, "Error"), json.dumps(body).encode() + b"\n",
                    [("Content-Type", "application/json")])


def _error(status: int, message: str, headers=()) -> Response:
    response = json_response(status, {"error": message})
    response.headers += list(headers)
    return response


def _body(request: Request) -> dict:
    if not request.body.strip():
        return {}
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if type(value) not in (int, float) or not low <= value <= high:
        raise BadRequest(f"{key} must be a number from {low:g} to {high:g}")
    return value


def _snapshot_args(body: dict) -> dict:
    path = body.get("dir")
    if not isinstance(path, str) or not path:
        raise BadRequest('snapshot needs {"dir": PATH}')
    return {"dir": path}


def _migrate_args(body: dict) -> dict:
    url = body.get("url")
    if not isinstance(url, str):
        raise BadRequest('migrate needs {"url": "tcp:HOST:PORT" or "unix:PATH"}')
    try:
        address = parse_address(url)
    except UsageError as err:
        raise BadRequest(str(err)) from None
    bandwidth = body.get("max_bandwidth_mib_s")
    return {"address": address,
            "downtime_ms": _number(body, "downtime_ms", DEFAULT_DOWNTIME_MS, *DOWNTIME_MS_RANGE),
            "timeout_s": _number(body, "timeout_s", DEFAULT_MIGRATION_TIMEOUT_S, *MIGRATION_TIMEOUT_S_RANGE),
            "max_bandwidth_mib_s": None if bandwidth is None else _number(body, "max_bandwidth_mib_s", 0,
                                                                          *MAX_BANDWIDTH_MIB_S_RANGE)}


# path -> (command, how its body becomes the command's arguments)
ACTIONS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "/v1/vm/pause": ("pause", lambda body: {}),
    "/v1/vm/resume": ("resume", lambda body: {}),
    "/v1/vm/stop": ("stop", lambda body: {}),
    "/v1/vm/snapshot": ("snapshot", _snapshot_args),
    "/v1/vm/migrate": ("migrate", _migrate_args),
}
STATUS_PATH = "/v1/vm"


class ControlApi:
    """The API socket at ``path``: ``status()`` answers GET, the rest queues Commands."""

    _server: HttpServer | None = None
    _socket: PrivateUnixSocket | None = None

    def __init__(self, path: str, status: Callable[[], dict]):
        self._status = status
        self._commands: queue.Queue[Command] = queue.Queue()
        self._socket = PrivateUnixSocket(path, "--api-socket")
        self._server = HttpServer(self._socket.sock, self._handle, "api")

    def _handle(self, request: Request) -> Response | Future:
        path = request.target.split("?", 1)[0].rstrip("/") or "/"
        if path == STATUS_PATH:
            if request.method not in ("GET", "HEAD"):
                return _error(405, f"{path} takes GET", [("Allow", "GET, HEAD")])
            return json_response(200, self._status())
        if path not in ACTIONS:
            return _error(404, f"no such path {path} (try GET {STATUS_PATH})")
        if request.method != "PUT":
            return _error(405, f"{path} takes PUT", [("Allow", "PUT")])
        name, arguments = ACTIONS[path]
        try:
            command = Command(name, arguments(_body(request)))
        except ApiError as err:
            return _error(err.status, str(err))
        answer: Future = Future()
        command.future.add_done_callback(lambda done: answer.set_result(_result_response(done)))
        self._commands.put(command)
        return answer

    def next_command(self, timeout: float) -> Command | None:
        """The next command for the main thread, waiting up to ``timeout`` seconds for one."""
        try:
            return self._commands.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Answer what is still queued (the VM is gone), flush answers, remove the socket."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            command.future.set_exception(ApiError("the VM stopped before this was done"))
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "ControlApi":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NoApi:
    """No --api-socket: the wait loop's pause between looks, and nothing else."""

    def next_command(self, timeout: float) -> Command | None:
        time.sleep(timeout)
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoApi":
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def _result_response(future: Future) -> Response:
    try:
        return json_response(200, future.result())
    except ApiError as err:
        return _error(err.status, str(err))
    except Exception as err:  # a bug in a command must still answer
        return _error(500, f"{type(err).__name__}: {err}")
