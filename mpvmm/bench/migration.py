"""``python -m mpvmm.bench.migration``: the downtime of live migrations, measured between real processes.

Each case starts a destination (``mpvmm start --incoming``) and a source
running the atomics workload, lets the guest run, migrates it through the
source's API and reads the source's report: downtime (pause to the
destination's "resumed"), its steps, total time, rounds. The cases are the
issue's goals: a 256 MiB guest over loopback TCP, a 1 GiB guest passed by
file descriptor. Runs are interleaved case by case so host drift hits all
alike; the table has the median and the range of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from mpvmm.api.client import request

CASES = {
    "tcp-256M": {"url": "tcp:127.0.0.1:{port}", "memory": "256M"},
    "unix-1G": {"url": "unix:{folder}/in.sock", "memory": "1G"},
}
GOALS_MS = {"tcp-256M": 300, "unix-1G": 20}
STEPS = ("pause", "last_round", "capture", "send_state", "confirmed")
DESTINATION_STEPS = ("receive", "check", "apply", "start")


def _start(folder: str, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    api = os.path.join(folder, f"{name}.sock")
    process = subprocess.Popen([sys.executable, "-m", "mpvmm", "start", "--no-metrics", "--api-socket", api,
                                "--console", os.devnull, *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, api


def _wait_running(api: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"mpvmm exited: {process.stderr.read()}")
        try:
            if os.path.exists(api) and request(api, "GET", "/v1/vm")[1]["state"] == "running":
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{api} never ran")
        time.sleep(0.05)


def migrate_once(case: str, cpus: int, port: int) -> dict:
    """One migration of ``case``; the source's migration report."""
    with tempfile.TemporaryDirectory() as folder:
        url = CASES[case]["url"].format(port=port, folder=folder)
        destination, destination_api = _start(folder, "destination", "--incoming", url)
        source, source_api = _start(folder, "source", "--cpus", str(cpus), "--memory", CASES[case]["memory"],
                                    "--workload", "atomics")
        try:
            _wait_running(source_api, source)
            time.sleep(1.0)
            status, answer = request(source_api, "PUT", "/v1/vm/migrate", {"url": url}, timeout=120)
            if status != 200:
                raise SystemExit(f"{case}: migration failed: {answer}")
            _wait_running(destination_api, destination)
            request(destination_api, "PUT", "/v1/vm/stop")
            source.wait(30)
            destination.wait(30)
            return answer["migration"]
        finally:
            for process in (source, destination):
                if process.poll() is None:
                    process.kill()
                process.wait()


def _summary(reports: list[dict]) -> dict:
    downtimes = [r["downtime_ms"] for r in reports]
    return {
        "downtime_ms": {"median": statistics.median(downtimes), "min": min(downtimes), "max": max(downtimes)},
        "steps_ms": {step: statistics.median(r["downtime_steps_ms"].get(step, 0.0) for r in reports)
                     for step in STEPS},
        "destination_steps_ms": {step: statistics.median(r["destination_downtime_steps_ms"].get(step, 0.0)
                                                         for r in reports) for step in DESTINATION_STEPS},
        "total_seconds": statistics.median(r["total_seconds"] for r in reports),
        "rounds": statistics.median(r["rounds"] for r in reports),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpvmm.bench.migration", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="migrations per case (default 5)")
    parser.add_argument("--cpus", type=int, default=4, help="vCPUs of the migrated guest (default 4)")
    parser.add_argument("--port", type=int, default=47700, help="the TCP case's loopback port (default 47700)")
    parser.add_argument("--json", metavar="FILE", help="write every report and the summary here")
    args = parser.parse_args(argv)
    reports: dict[str, list[dict]] = {case: [] for case in CASES}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeat):
        for case in CASES:
            reports[case].append(migrate_once(case, args.cpus, args.port))
    summary = {case: _summary(found) for case, found in reports.items()}
    print(f"{args.repeat} migrations per case, {args.cpus} vCPUs running atomics; "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"{'case':10} {'downtime ms (median, min-max)':32} {'goal':>6}  steps (median ms)")
    for case, found in summary.items():
        downtime = found["downtime_ms"]
        steps = ", ".join(f"{step} {found['steps_ms'][step]:.1f}" for step in STEPS if found["steps_ms"][step])
        there = ", ".join(f"{step} {found['destination_steps_ms'][step]:.1f}" for step in DESTINATION_STEPS)
        print(f"{case:10} {downtime['median']:8.1f} ({downtime['min']:.1f}-{downtime['max']:.1f}){'':14} "
              f"{GOALS_MS[case]:>6}  {steps} (there: {there}); total {found['total_seconds']:.2f} s, "
              f"{found['rounds']:g} rounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "reports": reports}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
