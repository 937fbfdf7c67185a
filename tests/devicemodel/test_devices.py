from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS, BusRange, Doorbell
from mpvmm.devicemodel.devices import Sink, TestDevice, all_ones, testdev_pattern


def test_pattern_definition():
    assert testdev_pattern(0, 1) == 0x5A
    assert testdev_pattern(0, 8) == 0x5A5A5A5A5A5A5A5A
    assert testdev_pattern(3, 2) == 0x5A59
    assert testdev_pattern(7, 4) == 0x5A5A5A5D
    for offset in range(8):
        for size in (1, 2, 4, 8):
            assert testdev_pattern(offset, size) == (0x5A5A5A5A5A5A5A5A ^ offset) & ((1 << (8 * size)) - 1)


def test_testdev_counts_reads_and_writes():
    dev = TestDevice()
    assert dev.read(2, 4) == testdev_pattern(2, 4)
    dev.write(0, 1, 5)
    dev.write(4, 2, 7)
    assert dev.stats() == {"writes": 2, "write_sum": 12, "reads": 1, "doorbells": 0, "doorbell_misses": 0,
                           "order_errors": 0}


def test_testdev_declares_its_registers_coalescible_and_its_doorbell():
    dev = TestDevice(registers=0x1000, doorbell_size=8, datamatch=1)
    assert dev.kernel_access.coalesced == (BusRange(0, 0x1000),)
    assert dev.kernel_access.doorbells == (Doorbell(0x1000, 8, 1),)
    assert Sink.kernel_access is NO_KERNEL_ACCESS


def test_testdev_doorbell_rings_from_kvm_and_from_matching_writes():
    dev = TestDevice(registers=8, doorbell_size=8, datamatch=1)
    dev.doorbell(8, 5)  # KVM signalled the eventfd five times
    dev.write(8, 8, 1)  # the same ring, reaching us as a write
    dev.write(8, 8, 2)  # a value the datamatch refuses: a miss, not a register write
    assert (dev.doorbells, dev.doorbell_misses, dev.writes, dev.write_sum) == (6, 1, 0, 0)
    anything = TestDevice(registers=8, doorbell_size=4)
    anything.write(8, 4, 12345)
    assert (anything.doorbells, anything.doorbell_misses) == (1, 0)


def test_testdev_checks_each_vcpus_sequence():
    dev = TestDevice()
    for value in (0x00_000001, 0x01_000007, 0x00_000002, 0x01_000008):  # two vCPUs, interleaved, in order
        dev.write(0, 4, value)
    assert dev.order_errors == 0
    dev.write(0, 4, 0x00_000004)  # vCPU 0 skipped 3: out of order
    dev.write(0, 8, (1 << 32) | 9)
    dev.write(0, 8, (1 << 32) | 10)
    dev.write(0, 8, (1 << 32) | 10)  # repeated
    dev.write(0, 2, 1)
    dev.write(0, 2, 7)  # narrow writes carry no sequence
    assert dev.order_errors == 2
    dev.write(0, 4, 0x00_FFFFFF)
    dev.write(0, 4, 0x00_000000)  # the count wraps at 24 bits
    assert dev.order_errors == 3  # 4 -> 0xFFFFFF was the break, the wrap is not


def test_testdev_sequence_table_stays_bounded():
    dev = TestDevice()
    for source in range(5000):
        dev.write(0, 8, (source << 32) | 1)  # a hostile guest's ever-new "vCPUs"
    assert len(dev._last_sequence) <= 1024


def test_testdev_sum_wraps_at_64_bits():
    dev = TestDevice()
    dev.write(0, 8, (1 << 64) - 1)
    dev.write(0, 8, 2)
    assert dev.write_sum == 1
    # a value wider than the access only contributes its low bytes
    dev.write(0, 1, 0x1FF)
    assert dev.write_sum == 0x100


def test_sink_reads_all_ones_and_counts():
    sink = Sink()
    assert sink.read(4, 4) == 0xFFFFFFFF
    assert sink.read(0, 1) == 0xFF
    sink.write(0, 4, 0x80000000)
    assert sink.read(0, 4) == 0xFFFFFFFF  # writes are dropped, nothing latches
    assert sink.stats() == {"reads": 3, "writes": 1}


def test_all_ones():
    assert [all_ones(s) for s in (1, 2, 4, 8)] == [0xFF, 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1]
