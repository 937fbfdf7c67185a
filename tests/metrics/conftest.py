"""Helpers for the metrics tests: scraping an endpoint and a real Prometheus server."""

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from mpvmm.metrics.top import parse


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def scrape_values(url: str) -> dict:
    """{(sample name, sorted label pairs): value} of one scrape."""
    return parse(fetch(url), time.monotonic()).samples


def series(samples: dict, name: str, **match) -> dict:
    """{labels dict as a sorted tuple: value} of the samples of ``name`` whose labels include ``match``."""
    return {labels: value for (sample, labels), value in samples.items()
            if sample == name and match.items() <= dict(labels).items()}


def value_by(samples: dict, name: str, key: str, **match) -> dict[str, float]:
    """{value of label ``key``: sample value} for the samples of ``name`` matching ``match``."""
    return {dict(labels)[key]: value for labels, value in series(samples, name, **match).items()}


def debian_prometheus_tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool`` (Debian's prometheus package)."""
    path = shutil.which(name)
    if path is None:
        # Fail, not skip: a silent skip would hide that the dashboards went untested.
        pytest.fail(f"{name} is not installed: run scripts/install.sh (Debian package prometheus)")
    return path


class PrometheusServer:
    """A private Prometheus scraping ``target`` every second, its data in ``folder``."""

    process: subprocess.Popen | None = None

    def __init__(self, folder, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: mpvmm\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = open(folder / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [debian_prometheus_tool("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query now; fails the test on a PromQL error."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            answer = json.loads(fetch(url))
        except urllib.error.HTTPError as err:
            pytest.fail(f"Prometheus refused {expr!r}: {err.read().decode()}")
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"prometheus exited: {self._log_tail()}"
            try:
                fetch(f"{self.url}/-/ready", timeout=1)
                return
            except OSError:
                assert time.monotonic() < deadline, f"prometheus not ready: {self._log_tail()}"
                time.sleep(0.1)

    def wait_for_scrapes(self, count: int, timeout: float = 20.0) -> None:
        """Until Prometheus holds ``count`` scrapes of the target in the last minute."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query("count_over_time(mpvmm_vm_info[1m])")
            if result and float(result[0]["value"][1]) >= count:
                return
            assert time.monotonic() < deadline, f"prometheus scraped too little: {result}"
            time.sleep(0.25)

    def _log_tail(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.log.close()
