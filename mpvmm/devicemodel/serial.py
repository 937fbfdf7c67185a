"""An 8250/16550A UART as a pure state machine, after vm-superio's ``serial.rs``.

The device owns no fd: bytes the guest transmits go to an ``out(bytes)``
callable, the interrupt line is raised through a ``trigger()`` callable, and
counters go to a ``SerialEvents`` record the owner can read. Host input enters
through ``enqueue_raw_bytes`` into a bounded 64-byte FIFO (vm-superio bounds
it because an unbounded buffer let a guest that never reads exhaust host
memory: CVE-2020-27173).

Where vm-superio and a real 16550A differ, this follows the 16550A (as QEMU
does): IIR reports the highest-priority pending source rather than OR-ing
them, reading IIR acknowledges a THR-empty interrupt, and enabling the
THR-empty interrupt while the holding register is empty raises it at once, so
Linux's 8250 driver drives transmission by interrupts instead of flagging
``UART_BUG_TXEN`` and polling.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS
from mpvmm.errors import DeviceModelError

# --- Register offsets from the UART's base port (8 consecutive ports). ---
DATA_OFFSET = 0  # write: THR (transmit holding), read: RBR (receive buffer)
IER_OFFSET = 1  # interrupt enable
IIR_OFFSET = 2  # read: IIR (interrupt identification)
FCR_OFFSET = 2  # write: FCR (FIFO control), same port as IIR
LCR_OFFSET = 3  # line control (word format, DLAB)
MCR_OFFSET = 4  # modem control (DTR, RTS, OUT1, OUT2, loopback)
LSR_OFFSET = 5  # line status (read-only)
MSR_OFFSET = 6  # modem status (read-only)
SCR_OFFSET = 7  # scratch: a free byte, used by drivers to probe for a UART
# With LCR.DLAB set, offsets 0 and 1 are the baud-rate divisor latch instead.
DLL_OFFSET = 0  # divisor latch, low byte
DLM_OFFSET = 1  # divisor latch, high byte
REGISTER_COUNT = 8

# The receive FIFO depth; host input beyond it is refused, not buffered.
FIFO_SIZE = 64

# --- IER: which conditions may raise the interrupt line. ---
IER_RDA_BIT = 0x01  # received data available
IER_THR_EMPTY_BIT = 0x02  # transmit holding register empty
IER_VALID_BITS = 0x0F  # the four sources a 16550A has; upper bits read 0

# --- IIR: the pending source, highest priority first (bit 0 set = none). ---
IIR_NONE = 0x01
IIR_RDA = 0x04  # received data available (priority 2)
IIR_THR_EMPTY = 0x02  # THR empty (priority 3)
IIR_FIFO_BITS = 0xC0  # "FIFOs enabled": makes Linux identify a 16550A

# --- FCR. ---
FCR_CLEAR_RX_BIT = 0x02  # empty the receive FIFO (Linux does it while probing)

# --- LCR. ---
LCR_DLAB_BIT = 0x80  # divisor latch access: offsets 0/1 become DLL/DLM
DEFAULT_LINE_CONTROL = 0x03  # 8 data bits, no parity, 1 stop bit

# --- MCR: outputs the driver sets; only loopback changes our behaviour. ---
MCR_DTR_BIT = 0x01  # data terminal ready
MCR_RTS_BIT = 0x02  # request to send
MCR_OUT1_BIT = 0x04  # auxiliary output 1
MCR_OUT2_BIT = 0x08  # auxiliary output 2 (gates the IRQ line on PC UARTs)
MCR_LOOP_BIT = 0x10  # loopback: THR feeds RBR, MCR outputs feed MSR inputs
MCR_VALID_BITS = 0x1F
DEFAULT_MODEM_CONTROL = MCR_OUT2_BIT

# --- LSR. ---
LSR_DATA_READY_BIT = 0x01  # RBR holds a byte
LSR_OVERRUN_BIT = 0x02  # a received byte was lost; cleared by reading LSR
LSR_THR_EMPTY_BIT = 0x20  # THR can take a byte: always, output is instant
LSR_IDLE_BIT = 0x40  # transmitter shift register empty too: always

# --- MSR: modem inputs. ---
MSR_CTS_BIT = 0x10  # clear to send (loopback: RTS)
MSR_DSR_BIT = 0x20  # data set ready (loopback: DTR)
MSR_RI_BIT = 0x40  # ring indicator (loopback: OUT1)
MSR_DCD_BIT = 0x80  # data carrier detect (loopback: OUT2)
# A cable that is always connected: CTS, DSR and DCD asserted.
DEFAULT_MODEM_STATUS = MSR_CTS_BIT | MSR_DSR_BIT | MSR_DCD_BIT

# The 8250's clock divided by 16: baud = 115200 / divisor.
BAUD_BASE = 115200
# Divisor 12: 9600 baud, the power-on setting vm-superio also uses.
DEFAULT_BAUD_DIVISOR = 12

# The state() keys, in order; from_state() refuses anything else.
_STATE_KEYS = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "thr_pending", "overrun", "fifo")


@dataclass
class SerialEvents:
    """Plain counters the UART increments; the owner turns them into metrics."""

    out_bytes: int = 0  # bytes the guest transmitted and out() took
    tx_lost_bytes: int = 0  # bytes the guest transmitted that out() failed on
    in_bytes: int = 0  # host bytes accepted into the receive FIFO
    in_refused_bytes: int = 0  # host bytes refused: FIFO full or loopback
    loopback_bytes: int = 0  # transmitted bytes looped back into the FIFO
    rx_overrun: int = 0  # looped-back bytes lost on a full FIFO (LSR.OE)
    interrupts: int = 0  # trigger() calls
    trigger_errors: int = 0  # trigger() calls that raised OSError

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _no_trigger() -> None:
    pass


def _no_output(data: bytes) -> None:
    pass


class Serial:
    """A 16550A UART; ``read``/``write`` take offsets from its base port."""

    # Never coalesced: a THR write raises the transmit interrupt the guest waits for.
    kernel_access = NO_KERNEL_ACCESS

    def __init__(
        self,
        trigger: Callable[[], None] | None = None,
        out: Callable[[bytes], None] | None = None,
        events: SerialEvents | None = None,
    ):
        self._trigger = trigger or _no_trigger
        self._out = out or _no_output
        self.events = events if events is not None else SerialEvents()
        self.interrupt_enable = 0
        self.line_control = DEFAULT_LINE_CONTROL
        self.modem_control = DEFAULT_MODEM_CONTROL
        self.scratch = 0
        self.divisor_low = DEFAULT_BAUD_DIVISOR & 0xFF
        self.divisor_high = DEFAULT_BAUD_DIVISOR >> 8
        # THR-empty interrupt latched: set when THR empties, cleared when
        # the guest reads IIR while it is the reported source.
        self.thr_pending = False
        self.overrun = False
        self._fifo: deque[int] = deque()
        # The enabled conditions last seen, so trigger() fires only for a new one.
        self._raised = 0

    # --- The guest's side: port accesses. ---

    def read(self, offset: int, size: int) -> int:
        """A guest read; a wide access reads consecutive registers (ISA bus split)."""
        value = 0
        for index in range(size):
            value |= self._read_byte(offset + index) << (8 * index)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write; a wide access writes consecutive registers, low byte first."""
        for index in range(size):
            self._write_byte(offset + index, (value >> (8 * index)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        dlab = self.line_control & LCR_DLAB_BIT
        if offset == DATA_OFFSET:
            if dlab:
                return self.divisor_low
            byte = self._fifo.popleft() if self._fifo else 0
            self._update_interrupt()
            return byte
        if offset == IER_OFFSET:
            return self.divisor_high if dlab else self.interrupt_enable
        if offset == IIR_OFFSET:
            source = self._pending_source()
            if source == IIR_THR_EMPTY:
                # The 16550A acknowledges THR-empty by this very read.
                self.thr_pending = False
                self._update_interrupt()
            return source | IIR_FIFO_BITS
        if offset == LCR_OFFSET:
            return self.line_control
        if offset == MCR_OFFSET:
            return self.modem_control
        if offset == LSR_OFFSET:
            status = LSR_THR_EMPTY_BIT | LSR_IDLE_BIT
            if self._fifo:
                status |= LSR_DATA_READY_BIT
            if self.overrun:
                status |= LSR_OVERRUN_BIT
                self.overrun = False  # error bits clear when LSR is read
            return status
        if offset == MSR_OFFSET:
            return self._modem_status()
        if offset == SCR_OFFSET:
            return self.scratch
        return 0xFF  # past the 8 registers: nothing drives the bus

    def _write_byte(self, offset: int, byte: int) -> None:
        dlab = self.line_control & LCR_DLAB_BIT
        if offset == DATA_OFFSET:
            if dlab:
                self.divisor_low = byte
            else:
                self._transmit(byte)
        elif offset == IER_OFFSET:
            if dlab:
                self.divisor_high = byte
            else:
                self._set_interrupt_enable(byte)
        elif offset == FCR_OFFSET:
            if byte & FCR_CLEAR_RX_BIT:
                self._fifo.clear()
                self._update_interrupt()
        elif offset == LCR_OFFSET:
            self.line_control = byte
        elif offset == MCR_OFFSET:
            self.modem_control = byte & MCR_VALID_BITS
        elif offset == SCR_OFFSET:
            self.scratch = byte
        # LSR and MSR are read-only; writes there are ignored like on hardware.

    def _transmit(self, byte: int) -> None:
        if self.modem_control & MCR_LOOP_BIT:
            self.events.loopback_bytes += 1
            if len(self._fifo) < FIFO_SIZE:
                self._fifo.append(byte)
            else:
                self.overrun = True
                self.events.rx_overrun += 1
        else:
            try:
                self._out(bytes((byte,)))
                self.events.out_bytes += 1
            except OSError:
                self.events.tx_lost_bytes += 1
        # Output is instant, so THR is empty again as soon as it was written.
        self.thr_pending = True
        self._update_interrupt()

    def _set_interrupt_enable(self, byte: int) -> None:
        newly_enabled = byte & ~self.interrupt_enable
        self.interrupt_enable = byte & IER_VALID_BITS
        if newly_enabled & IER_THR_EMPTY_BIT:
            # THR is always empty: a 16550A raises THRE when it is enabled.
            self.thr_pending = True
        self._update_interrupt()

    def _modem_status(self) -> int:
        if not self.modem_control & MCR_LOOP_BIT:
            return DEFAULT_MODEM_STATUS
        # Loopback wires the outputs to the inputs; Linux's probe checks
        # that MCR = LOOP|RTS|OUT2 reads back as MSR = CTS|DCD.
        status = 0
        if self.modem_control & MCR_RTS_BIT:
            status |= MSR_CTS_BIT
        if self.modem_control & MCR_DTR_BIT:
            status |= MSR_DSR_BIT
        if self.modem_control & MCR_OUT1_BIT:
            status |= MSR_RI_BIT
        if self.modem_control & MCR_OUT2_BIT:
            status |= MSR_DCD_BIT
        return status

    # --- Interrupts. ---

    def _conditions(self) -> int:
        """IER bits whose condition is present and enabled."""
        present = 0
        if self._fifo:
            present |= IER_RDA_BIT
        if self.thr_pending:
            present |= IER_THR_EMPTY_BIT
        return present & self.interrupt_enable

    def _pending_source(self) -> int:
        conditions = self._conditions()
        if conditions & IER_RDA_BIT:
            return IIR_RDA
        if conditions & IER_THR_EMPTY_BIT:
            return IIR_THR_EMPTY
        return IIR_NONE

    def _update_interrupt(self) -> None:
        conditions = self._conditions()
        appeared = conditions & ~self._raised
        self._raised = conditions
        if appeared:
            self.events.interrupts += 1
            try:
                self._trigger()
            except OSError:
                self.events.trigger_errors += 1

    # --- The host's side. ---

    def enqueue_raw_bytes(self, data: bytes) -> int:
        """Offer host input to the guest; returns how many bytes the FIFO took.

        The rest is refused (back-pressure, not loss): the caller keeps it and
        offers it again once the guest has read. In loopback mode the receiver
        is wired to the transmitter, so nothing from outside is taken.
        """
        if self.modem_control & MCR_LOOP_BIT:
            accepted = 0
        else:
            accepted = min(self.fifo_capacity(), len(data))
            self._fifo.extend(data[:accepted])
        self.events.in_bytes += accepted
        self.events.in_refused_bytes += len(data) - accepted
        if accepted:
            self._update_interrupt()
        return accepted

    def take_received(self) -> bytes:
        """Empty the receive FIFO and return what it held (for a UART that a restored one replaces)."""
        data = bytes(self._fifo)
        self._fifo.clear()
        return data

    def fifo_capacity(self) -> int:
        return FIFO_SIZE - len(self._fifo)

    @property
    def baud_divisor(self) -> int:
        return (self.divisor_high << 8) | self.divisor_low

    @property
    def baud_rate(self) -> int:
        """The rate the guest programmed (0 for a zero divisor)."""
        divisor = self.baud_divisor
        return BAUD_BASE // divisor if divisor else 0

    def stats(self) -> dict[str, int]:
        return {**self.events.as_dict(), "baud_rate": self.baud_rate}

    # --- Snapshots. ---

    def state(self) -> dict:
        """Everything needed to rebuild this UART, as plain msgpack-able values."""
        return {
            "ier": self.interrupt_enable,
            "lcr": self.line_control,
            "mcr": self.modem_control,
            "scr": self.scratch,
            "dll": self.divisor_low,
            "dlm": self.divisor_high,
            "thr_pending": self.thr_pending,
            "overrun": self.overrun,
            "fifo": bytes(self._fifo),
        }

    @classmethod
    def from_state(
        cls,
        state: dict,
        trigger: Callable[[], None] | None = None,
        out: Callable[[bytes], None] | None = None,
        events: SerialEvents | None = None,
    ) -> "Serial":
        """Rebuild a UART from ``state()``; refuses a state that could not occur."""
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            raise DeviceModelError(f"serial state needs exactly the keys {_STATE_KEYS}")
        for key in ("ier", "lcr", "mcr", "scr", "dll", "dlm"):
            if type(state[key]) is not int or not 0 <= state[key] <= 0xFF:
                raise DeviceModelError(f"serial state: {key} must be a byte, got {state[key]!r}")
        fifo = state["fifo"]
        if not isinstance(fifo, (bytes, bytearray)) or len(fifo) > FIFO_SIZE:
            raise DeviceModelError(f"serial state: fifo must be at most {FIFO_SIZE} bytes")
        serial = cls(trigger, out, events)
        serial.interrupt_enable = state["ier"] & IER_VALID_BITS
        serial.line_control = state["lcr"]
        serial.modem_control = state["mcr"] & MCR_VALID_BITS
        serial.scratch = state["scr"]
        serial.divisor_low = state["dll"]
        serial.divisor_high = state["dlm"]
        serial.thr_pending = bool(state["thr_pending"])
        serial.overrun = bool(state["overrun"])
        serial._fifo.extend(fifo)
        # A restored interrupt was already delivered before the snapshot.
        serial._raised = serial._conditions()
        return serial
