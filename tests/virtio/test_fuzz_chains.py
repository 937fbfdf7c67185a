"""Hypothesis with an oracle: good chains complete with the right data, one broken rule stops the queue there.

The guest offers a drawn list of good chains (any mix of readable and
writable buffers, direct or indirect, low RAM, high RAM, flush against the
end of either region), and may break one rule in one of them. Because the
breakage is made on purpose, the expected outcome is known exactly: every
chain before the broken one completes with the right bytes, and the device
declares DEVICE_NEEDS_RESET without completing it or anything after it.

The block device gets the same treatment against a model: a drawn sequence
of requests with drawn layouts, checked request by request against a
bytearray copy of the disk, and the file against the model at the end.
"""

import random
import struct
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mpvmm.virtio import block, spec
from mpvmm.virtio.block import Block
from mpvmm.virtio.entropy import MAX_BYTES_PER_REQUEST, Entropy
from tests.virtio.blk_driver import BlockGuest
from tests.virtio.driver import HIGH_RAM_ADDR, HIGH_RAM_SIZE, LOW_RAM_SIZE, Driver, RecordingRam, make_ram

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
NEXT, WRITE, INDIRECT = spec.VIRTQ_DESC_F_NEXT, spec.VIRTQ_DESC_F_WRITE, spec.VIRTQ_DESC_F_INDIRECT
QUEUE_SIZE = 64

# Each breaks one rule of spec 2.7.5 in the chain it hits.
DEFECTS = [
    "in_the_hole",
    "into_the_hole",
    "past_the_end",
    "huge_length",
    "loop",
    "next_out_of_table",
    "readable_after_writable",
    "head_out_of_table",
    "nested_indirect",
    "indirect_length",
    "indirect_with_next",
    "indirect_table_outside",
    "indirect_too_long",
    "indirect_not_negotiated",
]
NEEDS_INDIRECT = {d for d in DEFECTS if d.startswith(("nested", "indirect"))}

placements = st.sampled_from(["low", "high", "low_end", "high_end"])
buffers = st.lists(st.tuples(placements, st.integers(0, 48)), max_size=3)
chain_shapes = st.tuples(buffers, buffers, st.booleans())  # readable, writable, indirect


@st.composite
def offers(draw):
    """Chain shapes, and (which chain, which defect) for three examples in four."""
    shapes = draw(st.lists(chain_shapes, min_size=1, max_size=6))
    if draw(st.integers(0, 3)) == 3:
        return shapes, None, None
    return shapes, draw(st.integers(0, len(shapes) - 1)), draw(st.sampled_from(DEFECTS))


class Placer:
    """Hands out non-overlapping buffers: bump allocators, plus ones that end flush with each region."""

    def __init__(self, driver: Driver):
        self.driver = driver
        self.tops = {"low_end": LOW_RAM_SIZE, "high_end": HIGH_RAM_ADDR + HIGH_RAM_SIZE}

    def take(self, placement: str, length: int) -> tuple[int, int]:
        if placement == "low":
            return (self.driver.data.take(max(length, 1), 8), length)
        if placement == "high":
            return (self.driver.high_data.take(max(length, 1), 8), length)
        self.tops[placement] -= length
        return (self.tops[placement], length)


def descriptor_addresses(memory, queue, head) -> tuple[list[int], int | None]:
    """Where the chain's buffer descriptors sit (in order), and its ring descriptor if it is indirect."""
    ring = [queue.desc + 16 * i for i in queue.chains[head]]
    address, length, flags, _ = struct.unpack("<QIHH", memory.read(ring[0], 16))
    if flags & INDIRECT:
        return [address + 16 * i for i in range(length // 16)], ring[0]
    return ring, None


def patch(memory, at, **fields):
    values = dict(zip(("addr", "len", "flags", "next"), struct.unpack("<QIHH", memory.read(at, 16))))
    values.update(fields)
    memory.write(at, struct.pack("<QIHH", values["addr"], values["len"], values["flags"], values["next"]))


def field(memory, at, name):
    return dict(zip(("addr", "len", "flags", "next"), struct.unpack("<QIHH", memory.read(at, 16))))[name]


def break_chain(memory, queue, head, defect):
    """Break one rule in the chain at ``head``."""
    entries, ring = descriptor_addresses(memory, queue, head)
    first, last = entries[0], entries[-1]
    table_size = len(entries) if ring is not None else queue.size
    if defect == "in_the_hole":
        patch(memory, first, addr=LOW_RAM_SIZE + 0x100, len=8)
    elif defect == "into_the_hole":
        patch(memory, first, addr=LOW_RAM_SIZE - 4, len=8)
    elif defect == "past_the_end":
        patch(memory, last, addr=HIGH_RAM_ADDR + HIGH_RAM_SIZE - 4, len=8)
    elif defect == "huge_length":
        patch(memory, first, len=2**32 - 1)
    elif defect == "loop":
        patch(memory, last, flags=field(memory, last, "flags") | NEXT, next=0 if ring is not None else head)
    elif defect == "next_out_of_table":
        patch(memory, last, flags=field(memory, last, "flags") | NEXT, next=table_size)
    elif defect == "readable_after_writable":
        patch(memory, last, flags=field(memory, last, "flags") & ~WRITE)  # the chain has two writable at the end
    elif defect == "head_out_of_table":
        slot = next(i for i in range(queue.avail_idx) if memory.read_u16(queue.avail + 4 + 2 * i) == head)
        memory.write_u16(queue.avail + 4 + 2 * slot, QUEUE_SIZE + 3)
    elif defect == "nested_indirect":
        patch(memory, first, flags=INDIRECT, addr=field(memory, ring, "addr"), len=16)
    elif defect == "indirect_length":
        patch(memory, ring, len=field(memory, ring, "len") + 8)
    elif defect == "indirect_with_next":
        patch(memory, ring, flags=INDIRECT | NEXT, next=0)
    elif defect == "indirect_table_outside":
        patch(memory, ring, addr=HIGH_RAM_ADDR + HIGH_RAM_SIZE - 8)
    elif defect == "indirect_too_long":
        patch(memory, ring, len=16 * 1025)
    # "indirect_not_negotiated": the chain is fine, the feature is not.


def shape_for(shape, defect_here, defect):
    """Adjust a drawn chain so that the defect meant for it applies exactly."""
    readable, writable, indirect = shape
    if not readable and not writable:
        writable = [("low", 1)]
    if defect_here and defect == "readable_after_writable":
        writable = writable + [("low", 1)] * max(0, 2 - len(writable))
    if defect in ("in_the_hole", "into_the_hole", "huge_length") and defect_here and not readable + writable:
        writable = [("low", 1)]
    if defect == "indirect_not_negotiated":
        indirect = defect_here
    elif defect_here and defect in NEEDS_INDIRECT:
        indirect = True
    return readable, writable, indirect


@FUZZ
@given(offers())
def test_good_chains_complete_and_a_broken_rule_stops_the_queue_there(offer):
    shapes, target, defect = offer
    refuse = spec.feature_bit(spec.F_INDIRECT_DESC) if defect == "indirect_not_negotiated" else 0
    draws = []

    def numbered(length):
        """The k-th request gets bytes of value k: the data says which request filled it."""
        draws.append(length)
        return bytes([len(draws)]) * length

    buffer, memory = make_ram(RecordingRam)
    driver = Driver(Entropy(source=numbered), memory, buffer)
    queue = driver.probe(refuse=refuse, queue_size=QUEUE_SIZE)[0]
    placer = Placer(driver)
    offered = []
    for i, shape in enumerate(shapes):
        readable, writable, indirect = shape_for(shape, i == target, defect)
        out = [placer.take(p, n) for p, n in readable]
        in_ = [placer.take(p, n) for p, n in writable]
        head, buffers_written = queue.add(out=out, in_=in_, indirect=indirect)
        offered.append((head, buffers_written))
    if target is not None:
        break_chain(memory, queue, offered[target][0], defect)
        expected = target
    else:
        expected = len(shapes)
    queue.kick()
    event(f"defect: {defect if expected < len(shapes) else None}")
    event(f"chains completed: {min(expected, 3)}{'+' if expected >= 3 else ''}")

    used = queue.take_used()
    assert [head for head, _ in used] == [head for head, _ in offered[:expected]]
    assert driver.needs_reset == (expected < len(shapes))
    assert memory.outside == []
    number = 0
    for (_, length), (_, written) in zip(used, offered):
        capacity = sum(n for _, n in written)
        assert length == min(capacity, MAX_BYTES_PER_REQUEST)
        number += capacity > 0  # a chain with nothing to fill draws nothing
        data = b"".join(memory.read(a, n) for a, n in written)
        assert data == bytes([number]) * capacity


SECTORS = 32
layouts = st.fixed_dictionaries(
    {"pieces": st.sampled_from([1, 2, 4]), "indirect": st.booleans(), "split_header": st.booleans(), "high": st.booleans()}
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(0, SECTORS + 2), st.integers(1, 8), layouts),
        st.tuples(st.just("write"), st.integers(0, SECTORS + 2), st.integers(1, 8), layouts),
        st.tuples(st.just("flush")),
        st.tuples(st.just("get_id")),
        st.tuples(st.just("discard"), st.integers(0, SECTORS), st.integers(1, 8)),
        st.tuples(st.just("write_zeroes"), st.integers(0, SECTORS), st.integers(1, 8), st.booleans()),
    ),
    max_size=10,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(operations, st.integers(0, 2**32 - 1))
def test_block_requests_match_a_model_of_the_disk(ops, seed):
    rng = random.Random(seed)
    model = bytearray(rng.randbytes(SECTORS * 512))
    with tempfile.TemporaryFile() as disk:
        disk.write(model)
        guest = BlockGuest(Block(disk, disk_id=b"model"))
        for op in ops:
            kind = op[0]
            if kind in ("read", "write"):
                _, sector, count, layout = op
                in_range = sector + count <= SECTORS
                start, end = sector * 512, (sector + count) * 512
                if kind == "read":
                    status, data, _ = guest.read(sector, count * 512, **layout)
                    assert status == (block.S_OK if in_range else block.S_IOERR)
                    if in_range:
                        assert data == model[start:end]
                else:
                    data = rng.randbytes(count * 512)
                    assert guest.write(sector, data, **layout) == (block.S_OK if in_range else block.S_IOERR)
                    if in_range:
                        model[start:end] = data
            elif kind == "flush":
                assert guest.request(block.T_FLUSH)[0] == block.S_OK
            elif kind == "get_id":
                assert guest.request(block.T_GET_ID, in_lengths=[20])[1] == b"model".ljust(20, b"\0")
            else:
                sector, count = op[1], op[2]
                in_range = sector + count <= SECTORS
                if kind == "discard":
                    status = guest.ranges(block.T_DISCARD, [(sector, count, 0)])
                else:
                    status = guest.ranges(block.T_WRITE_ZEROES, [(sector, count, int(op[3]))])
                assert status == (block.S_OK if in_range else block.S_IOERR)
                if in_range:
                    # Discarded sectors read back as zeroes on a file that punches holes
                    # (write-zeroes guarantees it anyway).
                    model[sector * 512 : (sector + count) * 512] = bytes(count * 512)
        assert not guest.driver.needs_reset
        disk.seek(0)
        assert disk.read() == model
