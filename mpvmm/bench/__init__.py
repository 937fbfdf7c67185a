"""``mpvmm bench``: multi-vCPU exit throughput of each runner against KVM alone.

raw.py runs the built-in guest with the reference loop (_rawloop.c);
measure.py measures one run of any runner over a window; report.py turns
runs into records, a table and JSON; plot.py draws them; command.py is the
subcommand that schedules the runs.
"""
