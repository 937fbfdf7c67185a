"""A migration's report as metrics: rounds, pages per round, downtime and time, by role."""

from prometheus_client import CollectorRegistry, generate_latest

from mpvmm.metrics.collector import VmCollector, VmSources, migration_families

SOURCE = {"role": "source", "to": "tcp:127.0.0.1:1", "phase": "done", "rounds": 3,
          "pages_per_round": [100, 20, 2], "bytes": 499712, "downtime_ms": 12.5, "total_seconds": 0.8}
DESTINATION = {"role": "destination", "from": "127.0.0.1:5", "rounds": 3, "pages_per_round": [100, 20, 2],
               "receive_seconds": 0.7, "downtime_ms": 9.0}
IN_PROGRESS = {"role": "source", "to": "unix:/x", "phase": "copying", "rounds": 1, "pages_per_round": [7],
               "bytes": 28672}


def samples(report):
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in migration_families(report) for sample in family.samples}


def test_a_finished_migration():
    found = samples(SOURCE)
    assert found[("mpvmm_migration_rounds", (("role", "source"),))] == 3
    assert [found[("mpvmm_migration_round_pages", (("role", "source"), ("round", str(n))))] for n in (1, 2, 3)] == \
        [100, 20, 2]
    assert found[("mpvmm_migration_downtime_seconds", (("role", "source"),))] == 0.0125
    assert found[("mpvmm_migration_duration_seconds", (("role", "source"),))] == 0.8
    there = samples(DESTINATION)
    assert there[("mpvmm_migration_downtime_seconds", (("role", "destination"),))] == 0.009
    assert there[("mpvmm_migration_duration_seconds", (("role", "destination"),))] == 0.7


def test_one_in_progress_has_no_downtime_yet_and_none_has_nothing():
    names = {name for name, _labels in samples(IN_PROGRESS)}
    assert names == {"mpvmm_migration_rounds", "mpvmm_migration_round_pages"}
    assert migration_families(None) == []


def test_the_collector_exports_what_the_callable_says():
    reports = [None]
    collector = VmCollector({"version": "test"})
    registry = CollectorRegistry()
    registry.register(collector)
    collector.attach(VmSources(stats_pages=[], migration=lambda: reports[0]))
    assert b"mpvmm_migration" not in generate_latest(registry)
    reports[0] = SOURCE
    text = generate_latest(registry).decode()
    assert 'mpvmm_migration_rounds{role="source"} 3.0' in text
    assert 'mpvmm_migration_round_pages{role="source",round="2"} 20.0' in text
    collector.detach()
