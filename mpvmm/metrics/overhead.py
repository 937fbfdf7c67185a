"""What metrics cost a running VM: ``python -m mpvmm.metrics.overhead``.

Runs the ``pio-null`` workload (the fastest exits there are, all handled in
the run loop) with the exporter off, then on and scraped once a second over
HTTP as Prometheus would, alternating the order each repeat so that drift
of the host hits both alike, and prints exits/s of each and their ratio.
Then it times scrapes of a VM of that size and of a large one (64 vCPUs by
default) to show what one scrape costs the supervisor.
"""

import argparse
import statistics
import tempfile
import threading
import time
import urllib.request

from mpvmm.arguments import format_size, parse_number
from mpvmm.supervisor.run import RunConfig, Supervisor

SCRAPE_PERIOD_SECONDS = 1.0
PAUSE_TIMEOUT_SECONDS = 5.0


class _Scraper:
    """Scrapes ``url`` every ``period`` seconds on a thread until stopped; keeps durations."""

    def __init__(self, url: str, period: float):
        self.url, self.period = url, period
        self.durations: list[float] = []
        self.sizes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as response:
                self.sizes.append(len(response.read()))
            self.durations.append(time.perf_counter() - started)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_once(cpus: int, seconds: float, metrics: bool, console: str) -> tuple[float, list[float]]:
    """(exits/s, scrape durations) of one pio-null run."""
    scrapers = []
    config = RunConfig(cpus=cpus, memory=64 << 20, workload="pio-null", seconds=seconds, console=console,
                       metrics_port=0 if metrics else None)

    def start_scraping(vm):
        if metrics:
            scrapers.append(_Scraper(vm.metrics.url, SCRAPE_PERIOD_SECONDS))

    def stop_scraping(vm):
        for scraper in scrapers:
            scraper.stop()

    result = Supervisor(config, on_started=start_scraping, on_stopped=stop_scraping).run()
    if result.exit_code != 0:
        raise SystemExit(f"run failed: {result.status}")
    exits = sum(vcpu.exits.get("io", 0) for vcpu in result.vcpus)
    return exits / result.seconds, scrapers[0].durations if scrapers else []


def _scrape_times(url: str, scrapes: int) -> tuple[list[float], float, int]:
    """(wall seconds of each scrape, this process's CPU seconds per scrape, bytes of the last)."""
    durations, size = [], 0
    cpu_started = time.process_time()
    for _ in range(scrapes):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            size = len(response.read())
        durations.append(time.perf_counter() - started)
    return durations, (time.process_time() - cpu_started) / scrapes, size


def scrape_cost(cpus: int, scrapes: int, console: str) -> dict:
    """Scrapes of a ``cpus``-vCPU demo VM: wall time while it runs, CPU time while it is paused.

    Paused, the vCPU threads use no CPU, so the supervisor's CPU time is the
    scrape's own (the HTTP client here included, a small part of it).
    """
    found = {}

    def measure(vm):
        time.sleep(0.5)
        found["running"], _, found["bytes"] = _scrape_times(vm.metrics.url, scrapes)
        vm.vcpus.pause()
        if not vm.vcpus.wait_paused(PAUSE_TIMEOUT_SECONDS):
            raise SystemExit("the vCPUs did not pause")
        found["paused"], found["cpu"], _ = _scrape_times(vm.metrics.url, scrapes)
        vm.vcpus.resume()

    config = RunConfig(cpus=cpus, memory=256 << 20, workload="demo", seconds=0.1, console=console,
                       metrics_port=0)
    Supervisor(config, on_started=measure).run()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2, help="vCPUs of the pio-null runs (default 2)")
    parser.add_argument("--seconds", type=parse_number(0, 3600, low_allowed=False), default=5.0,
                        help="length of each run, at most an hour (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="off/on pairs (default 3; 0: scrape cost only)")
    parser.add_argument("--scrape-cpus", type=int, default=64,
                        help="vCPUs of the VM whose scrape cost is timed (default 64; 0: skip)")
    args = parser.parse_args(argv)
    if args.repeats < 0 or args.cpus < 1 or args.scrape_cpus < 0:
        parser.error("--repeats and --scrape-cpus must not be negative, --cpus must be positive")
    with tempfile.NamedTemporaryFile(prefix="mpvmm-overhead-console-") as console:
        rates = {False: [], True: []}
        scrape_durations = []
        if args.repeats:
            print(f"pio-null, {args.cpus} vCPUs, {args.seconds:g} s runs; metrics on = scraped every "
                  f"{SCRAPE_PERIOD_SECONDS:g} s over HTTP")
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            for metrics in order:
                rate, durations = run_once(args.cpus, args.seconds, metrics, console.name)
                rates[metrics].append(rate)
                scrape_durations += durations
                print(f"  repeat {repeat + 1}: metrics {'on ' if metrics else 'off'}  {rate:12,.0f} exits/s")
        if args.repeats:
            off, on = statistics.median(rates[False]), statistics.median(rates[True])
            print(f"median exits/s: off {off:,.0f}, on {on:,.0f}; on/off = {on / off:.3f}")
        if scrape_durations:
            print(f"scrapes during the runs: {len(scrape_durations)}, median "
                  f"{statistics.median(scrape_durations) * 1e3:.1f} ms, max {max(scrape_durations) * 1e3:.1f} ms")
        for cpus in (args.cpus, args.scrape_cpus):
            if not cpus:
                continue
            cost = scrape_cost(cpus, 20, console.name)
            print(f"scrape of a {cpus}-vCPU demo VM ({format_size(cost['bytes'])}): "
                  f"median {statistics.median(cost['running']) * 1e3:.0f} ms wall while it runs, "
                  f"{statistics.median(cost['paused']) * 1e3:.0f} ms wall and {cost['cpu'] * 1e3:.1f} ms CPU "
                  f"while its vCPUs are paused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
