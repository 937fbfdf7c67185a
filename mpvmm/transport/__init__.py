"""The two transports between the vCPUs and the device model (docs/protocol.md).

Each vCPU has a request channel and a reply channel carrying the same
msgpack records either way: POSIX message queues (``--transport mq``, the
baseline) or rings in POSIX shared memory with event suppression
(``--transport ring``). ``ring`` holds the rings' layout and protocol,
``channel`` a vCPU's end of either, ``server`` the device model's,
``polling`` how long the device model polls before it sleeps.
"""

TRANSPORTS = ("ring", "mq")
# The faster of the two in `mpvmm bench` on the development host (docs/benchmarks.md).
DEFAULT_TRANSPORT = "ring"
