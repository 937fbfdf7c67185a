"""The device-model process and its devices.

``bus`` (address ranges -> devices), ``serial`` (the 16550A UART),
``devices`` (test device, sinks), ``machine`` (the mpvmm device set and the
``DeviceModel`` dispatcher), ``protocol`` (the vCPU message schema),
``console`` and ``process`` (the process that serves the queues).
"""
