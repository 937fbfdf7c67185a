"""The supervisor's ``/metrics`` endpoint: one private registry, one server thread.

The port is bound when the exporter is created, which the supervisor does
before it creates the VM, so a busy port is a usage error that leaves
nothing behind. The server answers one request at a time on a thread named
``metrics``: Prometheus scrapes one at a time anyway, and a server that
handles requests on its own thread can be shut down completely (``close``
returns with no thread and no socket left), which a thread-per-request
server cannot promise.
"""

import errno
import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

from mpvmm import __version__
from mpvmm.errors import UsageError
from mpvmm.metrics.collector import VmCollector, VmSources, open_kvm_reader

POLL_SECONDS = 0.1  # how soon close() sees the server loop stop
CLIENT_TIMEOUT_SECONDS = 5.0  # a client that stops talking cannot hold the only server thread


class _QuietHandler(WSGIRequestHandler):
    """No access log: the terminal belongs to the guest console and the summary."""

    timeout = CLIENT_TIMEOUT_SECONDS

    def log_message(self, format, *args):
        pass


class _Server4(WSGIServer):
    address_family = socket.AF_INET


class _Server6(WSGIServer):
    address_family = socket.AF_INET6


def _bind(addr: str, port: int, app) -> WSGIServer:
    """A server listening on addr:port, or a UsageError naming the option to change."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--metrics-port must be between 0 and 65535, not {port}")
    try:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as err:
        raise UsageError(f"--metrics-addr {addr}: {err.strerror}") from err
    server_class = _Server6 if family == socket.AF_INET6 else _Server4
    try:
        return make_server(addr, port, app, server_class=server_class, handler_class=_QuietHandler)
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

    _server: WSGIServer | None = None
    _thread: threading.Thread | None = None

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
        self._server = _bind(addr, port, make_wsgi_app(self.registry))
        self.addr = addr
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, args=(POLL_SECONDS,),
                                        name="metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

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
                            migration=migration)
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
        """Detach, stop the server thread and close the socket. Idempotent."""
        self.detach()
        if self._thread is not None:
            if self._thread.is_alive():
                self._server.shutdown()
            self._thread.join()
            self._thread = None
        if self._server is not None:
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "MetricsExporter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
