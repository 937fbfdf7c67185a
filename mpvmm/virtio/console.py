"""virtio-console (spec 5.3), port 0 only: Linux's ``hvc0``.

No feature is offered (no MULTIPORT, SIZE or EMERG_WRITE), so the device
has exactly two queues, receiveq and transmitq of port 0, and a config space
the driver never reads.

- Output: every chain on transmitq is read (in bounded chunks, whatever its
  length) and passed to ``out(bytes)``; a sink that raises OSError loses the
  bytes, counted, and the chain still completes.
- Input: the host offers bytes with ``enqueue_input``; they wait in a
  bounded buffer (``INPUT_BUFFER_SIZE``, beyond which they are refused, as
  the UART's FIFO refuses them) until the driver has a receive buffer. The
  owner calls the transport's ``process_queue(RECEIVE_QUEUE)`` after
  enqueuing; receive chains are taken only while input is waiting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from mpvmm.errors import StateError
from mpvmm.virtio import spec
from mpvmm.virtio.device import VirtioDevice

RECEIVE_QUEUE = 0  # receiveq(port0): host to guest
TRANSMIT_QUEUE = 1  # transmitq(port0): guest to host
QUEUE_SIZE = 64
INPUT_BUFFER_SIZE = 16 * 1024
# Output is read from guest RAM this many bytes at a time.
TRANSMIT_CHUNK = 64 * 1024
# struct virtio_console_config: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr; all unused.
CONFIG_SIZE = 12


@dataclass
class ConsoleStats:
    """Plain counters; the owner turns them into metrics."""

    out_bytes: int = 0  # guest output out() took
    tx_lost_bytes: int = 0  # guest output out() failed on
    in_bytes: int = 0  # host input accepted into the buffer
    in_refused_bytes: int = 0  # host input refused: buffer full
    rx_bytes: int = 0  # input delivered into guest buffers

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _no_output(data: bytes) -> None:
    pass


class Console(VirtioDevice):
    """A virtio console whose port 0 writes to ``out`` and reads from ``enqueue_input``."""

    device_id = spec.DEVICE_ID_CONSOLE
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, out: Callable[[bytes], None] | None = None, input_capacity: int = INPUT_BUFFER_SIZE):
        self._out = out or _no_output
        self._capacity = input_capacity
        self._input = bytearray()
        self.stats = ConsoleStats()

    def config(self) -> bytes:
        return bytes(CONFIG_SIZE)

    # --- The host's side. ---

    def state(self) -> dict:
        return {"input": bytes(self._input)}  # typed, not yet read by the guest

    def check_state(self, record: object) -> None:
        if not isinstance(record, dict) or not isinstance(record.get("input"), bytes) \
                or len(record["input"]) > self._capacity:
            raise StateError(f"the console's record is not its input of at most {self._capacity} bytes")

    def restore_state(self, record: dict) -> None:
        self._input = bytearray(record["input"])

    def enqueue_input(self, data: bytes) -> int:
        """Offer host input; returns how many bytes were accepted (the rest is refused)."""
        accepted = max(0, min(len(data), self._capacity - len(self._input)))
        self._input += data[:accepted]
        self.stats.in_bytes += accepted
        self.stats.in_refused_bytes += len(data) - accepted
        return accepted

    @property
    def pending_input(self) -> int:
        return len(self._input)

    # --- The queues. ---

    def process(self, index: int) -> int:
        if index == RECEIVE_QUEUE:
            return self._receive()
        if index == TRANSMIT_QUEUE:
            return self._transmit()
        return 0

    def _receive(self) -> int:
        queue = self.queues[RECEIVE_QUEUE]
        completed = 0
        while self._input and (chain := queue.pop()) is not None:
            count = min(len(self._input), chain.writable_length)
            chain.write(self.memory, 0, bytes(self._input[:count]))
            del self._input[:count]
            queue.push_used(chain.head, count)
            self.stats.rx_bytes += count
            completed += 1
        return completed

    def _transmit(self) -> int:
        queue = self.queues[TRANSMIT_QUEUE]
        completed = 0
        while (chain := queue.pop()) is not None:
            for address, length in chain.readable:
                for offset in range(0, length, TRANSMIT_CHUNK):
                    self._emit(self.memory.read(address + offset, min(TRANSMIT_CHUNK, length - offset)))
            queue.stats.bytes_read += chain.readable_length
            queue.push_used(chain.head, 0)
            completed += 1
        return completed

    def _emit(self, data: bytes) -> None:
        try:
            self._out(data)
        except OSError:
            self.stats.tx_lost_bytes += len(data)
            return
        self.stats.out_bytes += len(data)
