"""The supervisor's ``/metrics`` endpoint: one private registry, one server thread.

The port is bound when the exporter is created, which the supervisor does
before it creates the VM, so a busy port is a usage error that leaves
nothing behind. One thread named ``metrics`` serves every connection
(``mpvmm/http_server.py``: a deadline for each whole request, a cap on
connections), so no client can hold the endpoint or delay the end of a
run, and ``close`` returns with no thread and no socket left.
prometheus_client writes the exposition; ``/metrics`` is served, ``/`` is
a pointer to it, every other path is 404, GET and HEAD are allowed.
"""

import errno
import gzip
import socket
import urllib.parse
from collections.abc import Callable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted

from mpvmm import __version__
from mpvmm.errors import UsageError
from mpvmm.metrics.collector import VmCollector, VmSources, open_kvm_reader
from mpvmm.http_server import HttpServer, Request, Response

LISTEN_BACKLOG = 64
POINTER_PAGE = (b"<html><head><title>mpvmm</title></head><body><h1>mpvmm</h1>"
                b'<p><a href="/metrics">Metrics</a></p></body></html>\n')


def _bind(addr: str, port: int) -> socket.socket:
    """A socket listening on addr:port, or a UsageError naming the option to change."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--metrics-port must be between 0 and 65535, not {port}")
    try:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as err:
        raise UsageError(f"--metrics-addr {addr}: {err.strerror}") from err
    try:
        return socket.create_server((addr, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UsageError(f"--metrics-port {port}: {addr}:{port} is already in use "
                             f"(choose another --metrics-port, or --no-metrics)") from err
        if err.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--metrics-addr {addr}: not an address of this host") from err
        if err.errno == errno.EACCES:
            raise UsageError(f"--metrics-port {port}: permission denied (ports below 1024 need privileges)") from err
        raise UsageError(f"--metrics-addr {addr} --metrics-port {port}: cannot listen: {err.strerror}") from err


class _RunnerPids:
    """Each vCPU runner's pid, read when a scrape asks: a worker process has none until it starts."""

    def __init__(self, runners):
        self._runners = runners

    def __len__(self) -> int:
        return len(self._runners)

    def __getitem__(self, index: int) -> int:
        return self._runners[index].pid


class MetricsExporter:
    """Serves ``/metrics`` for one run on ``addr:port`` (port 0: any free port).

    ``info`` labels ``mpvmm_vm_info``. Until ``attach`` the endpoint has only
    that and the supervisor's process metrics; ``detach`` goes back to that;
    ``close`` (or the end of a ``with`` block) stops the server.
    """

    _server: HttpServer | None = None

    def __init__(self, addr: str, port: int, info: dict[str, str]):
        self.registry = CollectorRegistry()
        self.collector = VmCollector({"version": __version__, **info})
        self.registry.register(self.collector)
        # Two ProcessCollectors with their own prefixes: both would be
        # process_* and collide in one registry otherwise.
        ProcessCollector(namespace="mpvmm_supervisor", registry=self.registry)
        self._device_model_pid: int | None = None
        ProcessCollector(namespace="mpvmm_device_model", pid=self._device_model_proc_name,
                         registry=self.registry)
        listener = _bind(addr, port)
        try:
            self._server = HttpServer(listener, self._answer, thread_name="metrics")
        except BaseException:
            listener.close()
            raise
        self.addr = addr
        self.port = self._server.port

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def _answer(self, request: Request) -> Response:
        """What each request gets (on the server thread)."""
        url = urllib.parse.urlsplit(request.target)
        if request.method not in ("GET", "HEAD"):
            return Response(405, "Method Not Allowed", b"GET or HEAD\n", [("Allow", "GET, HEAD")])
        if request.target.startswith("/") and url.path == "/metrics":
            return self._exposition(request, urllib.parse.parse_qs(url.query))
        if request.target.startswith("/") and url.path == "/":
            return Response(200, "OK", POINTER_PAGE, [("Content-Type", "text/html; charset=utf-8")])
        return Response(404, "Not Found", b"not found: see /metrics\n", [("Content-Type", "text/plain")])

    def _exposition(self, request: Request, params: dict[str, list[str]]) -> Response:
        """prometheus_client's text (or OpenMetrics, if asked), gzipped if accepted, as its own server does."""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        registry = self.registry.restricted_registry(params["name[]"]) if "name[]" in params else self.registry
        body = encoder(registry)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        return Response(200, "OK", body, headers)

    def _device_model_proc_name(self) -> str:
        # A /proc entry that never exists makes ProcessCollector export nothing.
        return str(self._device_model_pid) if self._device_model_pid else "none"

    def attach(self, vm, migration: Callable[[], dict | None] | None = None) -> None:
        """Start exporting ``vm`` (supervisor.run.RunningVm: its vCPUs, KVM stats, guest, device model),
        and ``migration()``'s report of a migration, once there is one.

        Call it before the vCPUs start: opening a vCPU's stats fd is a vCPU
        ioctl, which waits for the vCPU's mutex, and a running vCPU holds it
        for as long as it stays in KVM_RUN (for ever, for an AP waiting for
        its SIPI, or a halted one).
        """
        sources = VmSources(stats_pages=[runner.stats for runner in vm.vcpus],
                            worker_pids=_RunnerPids(vm.vcpus.runners),
                            guest_counts=vm.guest.counts, device_stats=vm.device_model.stats,
                            virtio_stats=vm.virtio.stats if len(vm.virtio) else None, migration=migration)
        vm_stats_fd, vcpu_stats_fds = vm.host.kvm_stats_fds()
        try:
            # One fd per vCPU for the whole run: reopening per scrape would
            # cost an ioctl and a descriptor parse each time.
            sources.kvm_vcpu_readers = [open_kvm_reader(open_fd) for open_fd in vcpu_stats_fds]
            if vm_stats_fd is not None:
                sources.kvm_vm_reader = open_kvm_reader(vm_stats_fd)
        except BaseException:
            sources.close()
            raise
        self._device_model_pid = vm.device_model.pid
        self.collector.attach(sources)

    def detach(self) -> None:
        """Stop reading the VM (before it is torn down); waits for a scrape in flight."""
        self.collector.detach()
        self._device_model_pid = None

    def close(self) -> None:
        """Detach, stop the server thread and close every socket. Idempotent; never waits on a client."""
        self.detach()
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> "MetricsExporter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
