"""Telling a stuck L1 CPU from a slow one by the L1 kernel's RCU stall reports (pure, no QEMU)."""

from tests.nested.l1 import a_cpu_is_stuck

# L1's console as it was when its CPU 0 had been stuck for minutes running an L2.
STALL = """[  361.110350] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
[  361.110350] rcu: \t0-...0: (1 GPs behind) idle=ea2c/1/0x4000000000000000 softirq=2636/2637 fqs=35721
[  361.110536] \t(detected by 1, t=84027 jiffies, g=4025, q=23158 ncpus=2)
[  361.110676] Sending NMI from CPU 1 to CPUs 0:
"""


def test_one_stall_report_is_a_slow_cpu_and_a_second_is_a_stuck_one():
    assert not a_cpu_is_stuck("")
    assert not a_cpu_is_stuck("[   12.0] Run /init as init process\n" + STALL)
    assert a_cpu_is_stuck(STALL + "[  424.130001] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n")
