"""virtio-rng: random bytes into every buffer the driver offers, bounded per request."""

from mpvmm.virtio import entropy, spec
from mpvmm.virtio.entropy import Entropy
from tests.virtio.driver import Driver


def test_buffers_are_filled_from_the_source():
    asked = []

    def source(n):
        asked.append(n)
        return bytes([7]) * n

    device = Entropy(source=source)
    driver = Driver(device)
    queue = driver.probe()[0]
    assert driver.read(0x008) == spec.DEVICE_ID_ENTROPY
    head, [(address, length)] = queue.add(in_=[32])
    queue.kick()
    assert queue.take_used() == [(head, 32)]
    assert driver.memory.read(address, 32) == bytes([7]) * 32
    assert asked == [32]
    assert (device.stats.requests, device.stats.bytes) == (1, 32)


def test_the_default_source_is_the_hosts():
    driver = Driver(Entropy())
    queue = driver.probe()[0]
    _, [(a, _)] = queue.add(in_=[64])
    _, [(b, _)] = queue.add(in_=[64])
    queue.kick()
    assert driver.memory.read(a, 64) != driver.memory.read(b, 64)


def test_a_huge_buffer_gets_at_most_the_per_request_cap():
    device = Entropy(source=lambda n: bytes(n))
    driver = Driver(device)
    queue = driver.probe()[0]
    head, _ = queue.add(in_=[entropy.MAX_BYTES_PER_REQUEST + 4096])
    queue.kick()
    assert queue.take_used() == [(head, entropy.MAX_BYTES_PER_REQUEST)]


def test_a_failing_or_short_source_and_readable_chains_complete_short():
    answers = [OSError("no entropy"), b"ab"]

    def source(n):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    device = Entropy(source=source)
    driver = Driver(device)
    queue = driver.probe()[0]
    first, _ = queue.add(in_=[8])
    second, _ = queue.add(in_=[8])
    third, _ = queue.add(out=[b"read-only"])
    queue.kick()
    assert queue.take_used() == [(first, 0), (second, 2), (third, 0)]
    assert (device.stats.source_errors, device.stats.empty_requests) == (1, 2)
    assert not driver.needs_reset
