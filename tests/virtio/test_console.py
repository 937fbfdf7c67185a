"""virtio-console port 0: output to a sink, input from a bounded buffer, as Linux's hvc0 uses them."""

from mpvmm.virtio import console, spec
from mpvmm.virtio.console import Console
from tests.virtio.driver import POISON, Driver


def console_guest(**kwargs):
    output = []
    device = Console(out=output.append, **kwargs)
    driver = Driver(device)
    receive, transmit = driver.probe()
    return driver, device, receive, transmit, output


def test_identity_and_no_features():
    driver, device, *_ = console_guest()
    assert driver.transport.device.device_id == spec.DEVICE_ID_CONSOLE
    assert device.device_features() == 0
    assert device.queue_sizes == (console.QUEUE_SIZE, console.QUEUE_SIZE)
    assert device.config() == bytes(12)


def test_output_reaches_the_sink():
    driver, device, _, transmit, output = console_guest()
    head, _ = transmit.add(out=[b"hello, ", b"hvc0\n"])
    transmit.kick()
    assert b"".join(output) == b"hello, hvc0\n"
    assert transmit.take_used() == [(head, 0)]  # the device wrote nothing
    assert device.stats.out_bytes == 12
    assert driver.transport.queues[console.TRANSMIT_QUEUE].stats.bytes_read == 12


def test_large_output_is_read_in_bounded_chunks():
    _, device, _, transmit, output = console_guest()
    data = bytes(range(256)) * 1024  # 256 KiB in one buffer
    transmit.add(out=[data])
    transmit.kick()
    assert b"".join(output) == data
    assert max(len(chunk) for chunk in output) <= console.TRANSMIT_CHUNK


def test_a_failing_sink_loses_bytes_but_completes_the_chain():
    def sink(data):
        raise OSError("terminal gone")

    device = Console(out=sink)
    driver = Driver(device)
    _, transmit = driver.probe()
    transmit.add(out=[b"lost"])
    transmit.kick()
    assert len(transmit.take_used()) == 1
    assert device.stats.tx_lost_bytes == 4


def test_input_waits_for_receive_buffers():
    driver, device, receive, _, _ = console_guest()
    assert device.enqueue_input(b"typed before the driver had buffers") == 35
    driver.transport.process_queue(console.RECEIVE_QUEUE)  # nothing to fill yet
    head, [(address, length)] = receive.add(in_=[16])
    receive.kick()
    assert receive.take_used() == [(head, 16)]
    assert driver.memory.read(address, 16) == b"typed before the"
    head, [(address, _)] = receive.add(in_=[64])
    receive.kick()
    assert receive.take_used() == [(head, 19)]
    assert driver.memory.read(address, 20) == b" driver had buffers" + bytes([POISON])
    assert device.pending_input == 0
    assert device.stats.rx_bytes == 35


def test_receive_buffers_are_taken_only_when_input_arrives():
    driver, device, receive, _, _ = console_guest()
    receive.add(in_=[8])
    receive.kick()
    assert receive.take_used() == []
    interrupts = driver.interrupts
    device.enqueue_input(b"ls\n")
    driver.transport.process_queue(console.RECEIVE_QUEUE)
    assert receive.take_used()[0][1] == 3
    assert driver.interrupts == interrupts + 1


def test_input_is_bounded():
    _, device, _, _, _ = console_guest(input_capacity=8)
    assert device.enqueue_input(b"0123456789") == 8
    assert device.enqueue_input(b"x") == 0
    assert (device.stats.in_bytes, device.stats.in_refused_bytes) == (8, 3)


def test_input_survives_a_driver_reset():
    driver, device, *_ = console_guest()
    device.enqueue_input(b"keep")
    driver.write(0x70, 0)
    receive, _ = driver.probe()
    head, [(address, _)] = receive.add(in_=[8])
    receive.kick()
    assert receive.take_used() == [(head, 4)]
    assert driver.memory.read(address, 4) == b"keep"


def test_chains_of_the_wrong_direction_complete_empty():
    """A receive buffer the device cannot write, output buffers the device could: nothing moves."""
    driver, device, receive, transmit, output = console_guest()
    device.enqueue_input(b"abc")
    rx_head, _ = receive.add(out=[b"ro"])
    receive.kick()
    tx_head, _ = transmit.add(in_=[4])
    transmit.kick()
    assert receive.take_used() == [(rx_head, 0)]
    assert transmit.take_used() == [(tx_head, 0)]
    assert output == [] and device.pending_input == 3
    assert not driver.needs_reset
