"""The device-model process and its devices.

``bus`` (address ranges -> devices), ``serial`` (the 16550A UART),
``devices`` (test device, sinks), ``machine`` (the mpvmm device set and the
``DeviceModel`` dispatcher), ``pc`` with ``rtc``, ``i8042`` and ``acpi_pm``
(the devices a Linux guest adds, and its IRQ map), ``protocol`` (the vCPU
message schema), ``config`` (the configure message), ``host_console`` and
``host_input`` (the guest console's host side), ``sandbox``, and
``process`` (the process that serves the queues).
"""
