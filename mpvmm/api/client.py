"""``mpvmm ctl --api-socket PATH status|pause|resume|stop|snapshot DIR|migrate URL``: the API's client.

One HTTP/1.1 request over the Unix socket, as ``curl --unix-socket PATH
http://localhost/v1/vm`` would send it. The answer's JSON is printed; an
error answer is its message on one line and exit 1.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys

from mpvmm.errors import MpvmmError

# A migration answers when it is over: allow for its timeout and the rest.
ANSWER_MARGIN_SECONDS = 30.0
DEFAULT_TIMEOUT_SECONDS = 60.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(path: str, method: str, target: str, body: dict | None = None,
            timeout: float = DEFAULT_TIMEOUT_SECONDS) -> tuple[int, dict]:
    """(status, JSON body) of one request to the API at ``path``; MpvmmError if there is no answer."""
    connection = _UnixConnection(path, timeout)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except FileNotFoundError:
        raise MpvmmError(f"no API socket at {path}: is `mpvmm start --api-socket {path}` running?") from None
    except ConnectionRefusedError:
        raise MpvmmError(f"nothing listens on {path} (a VMM that ended without removing it?)") from None
    except TimeoutError:
        raise MpvmmError(f"the VMM at {path} did not answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as err:
        raise MpvmmError(f"the API at {path} failed: {err}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        raise MpvmmError(f"the API at {path} answered {response.status} with something not JSON") from None
    return response.status, answer if isinstance(answer, dict) else {"answer": answer}


def command_request(args) -> tuple[str, str, dict | None, float]:
    """(method, path, body, timeout) for the parsed ``mpvmm ctl`` arguments."""
    match args.action:
        case "status":
            return "GET", "/v1/vm", None, DEFAULT_TIMEOUT_SECONDS
        case "pause" | "resume" | "stop":
            return "PUT", f"/v1/vm/{args.action}", {}, DEFAULT_TIMEOUT_SECONDS
        case "snapshot":
            return "PUT", "/v1/vm/snapshot", {"dir": os.path.abspath(args.target)}, DEFAULT_TIMEOUT_SECONDS
        case "migrate":
            body = {"url": args.target, "downtime_ms": args.downtime_ms, "timeout_s": args.timeout,
                    "max_bandwidth_mib_s": args.max_bandwidth}
            return "PUT", "/v1/vm/migrate", body, args.timeout + ANSWER_MARGIN_SECONDS
    raise MpvmmError(f"unknown action {args.action}")


def run_ctl(args) -> int:
    method, target, body, timeout = command_request(args)
    status, answer = request(args.api_socket, method, target, body, timeout)
    if status != 200:
        print(f"mpvmm: error: {answer.get('error', answer)} (HTTP {status})", file=sys.stderr)
        return 1
    json.dump(answer, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
