import pytest

from mpvmm.devicemodel.bus import ADDRESS_LIMIT, Bus, BusError, BusRange
from mpvmm.errors import DeviceModelError


def test_range_refuses_zero_and_negative_length():
    with pytest.raises(BusError, match="length 0"):
        BusRange(0x3F8, 0)
    with pytest.raises(BusError):
        BusRange(0x3F8, -1)
    with pytest.raises(BusError, match="negative"):
        BusRange(-1, 4)


def test_range_refuses_overflow_but_may_end_at_the_top():
    BusRange(ADDRESS_LIMIT - 1, 1)  # the very last byte is addressable
    with pytest.raises(BusError, match="past the end"):
        BusRange(ADDRESS_LIMIT - 1, 2)
    with pytest.raises(BusError):
        BusRange(ADDRESS_LIMIT, 1)


def test_range_refuses_non_integers():
    with pytest.raises(BusError):
        BusRange(1.0, 4)
    with pytest.raises(BusError):
        BusRange(0, True)


def test_bus_error_is_a_device_model_error():
    assert issubclass(BusError, DeviceModelError)


def test_range_contains_and_overlaps():
    r = BusRange(0x10, 0x10)
    assert r.end == 0x20
    assert r.contains(0x10) and r.contains(0x1F)
    assert not r.contains(0xF) and not r.contains(0x20)
    assert r.overlaps(BusRange(0x1F, 1))
    assert r.overlaps(BusRange(0, 0x100))
    assert not r.overlaps(BusRange(0x20, 1))
    assert not r.overlaps(BusRange(0, 0x10))


def make_bus():
    bus = Bus("pio")
    bus.insert(BusRange(0x100, 8), "a", "dev-a")
    bus.insert(BusRange(0x10, 4), "b", "dev-b")
    bus.insert(BusRange(0x108, 1), "c", "dev-c")  # adjacent to a: allowed
    return bus


def test_lookup_edges_give_offsets():
    bus = make_bus()
    assert bus.lookup(0x100) == ("a", "dev-a", 0)
    assert bus.lookup(0x107) == ("a", "dev-a", 7)
    assert bus.lookup(0x108) == ("c", "dev-c", 0)
    assert bus.lookup(0x109) is None
    assert bus.lookup(0xFF) is None
    assert bus.lookup(0x13) == ("b", "dev-b", 3)
    assert bus.lookup(0x14) is None
    assert bus.lookup(0) is None
    assert bus.lookup(ADDRESS_LIMIT - 1) is None
    assert bus.lookup(-5) is None


def test_lookup_on_empty_bus():
    assert Bus("mmio").lookup(0) is None


@pytest.mark.parametrize(
    "base, length",
    [(0x100, 1), (0xFF, 2), (0x107, 1), (0xF0, 0x100), (0x12, 0x100), (0x10, 4), (0x13, 1)],
)
def test_insert_refuses_overlap_and_names_both(base, length):
    bus = make_bus()
    with pytest.raises(BusError, match="overlaps") as info:
        bus.insert(BusRange(base, length), "x", "dev-x")
    assert "dev-x" in str(info.value)
    assert len(bus) == 3  # nothing was added


def test_insert_refuses_a_non_range():
    with pytest.raises(BusError):
        Bus("pio").insert((0, 4), "x", "x")


def test_lookup_at_the_top_of_the_address_space():
    bus = Bus("mmio")
    bus.insert(BusRange(ADDRESS_LIMIT - 16, 16), "top", "top")
    assert bus.lookup(ADDRESS_LIMIT - 1) == ("top", "top", 15)
    assert bus.lookup(ADDRESS_LIMIT - 17) is None


def test_iteration_is_sorted():
    assert [e.name for e in make_bus()] == ["dev-b", "dev-a", "dev-c"]
