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
    assert dev.stats() == {"writes": 2, "write_sum": 12, "reads": 1}


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
