"""An i8042 keyboard controller: enough for Linux's probe and for reset.

Ports 0x60 (data) and 0x64 (status read, command write), offsets 0 and 4
here. It answers the controller commands Linux's i8042 driver sends while
probing (self-test, interface tests, the command byte), acknowledges bytes
meant for the keyboard, and turns the reset command (0xFE, or 0xD1 with
bit 0 clear) into a ``reset()`` call: a reboot, which mpvmm ends cleanly.
There is no AUX (mouse) port and no key input. IRQ 1 is raised through
``trigger()`` when a byte lands in the output buffer with the keyboard
interrupt enabled.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS
from mpvmm.devicemodel.device_state import expect_bytes, expect_keys, expect_uint

DATA_OFFSET = 0
STATUS_OFFSET = 4  # read: status; write: controller command

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04  # set once the self-test has passed
STATUS_LAST_WAS_COMMAND = 0x08
STATUS_NOT_INHIBITED = 0x10  # the keyboard lock switch is off (clear: Linux warns "Keylock active")

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
AUX_ABSENT = 0xFF  # "interface test failed": Linux gives up on the AUX port
KBD_ACK = 0xFA
KBD_RESET = 0xFF
KBD_SELF_TEST_PASSED = 0xAA

CTR_KBD_INT = 0x01
CTR_SYSTEM_FLAG = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_XLATE
OUTPUT_PORT_RESET_LINE = 0x01  # cleared: the CPU's reset line is pulsed
OUTPUT_BUFFER_MAX = 16


def _no_action() -> None:
    pass


class I8042:
    # Never coalesced: a command decides what the next read answers (and 0xFE resets).
    kernel_access = NO_KERNEL_ACCESS

    def __init__(self, reset: Callable[[], None] | None = None, trigger: Callable[[], None] | None = None):
        self._reset = reset or _no_action
        self._trigger = trigger or _no_action
        self.command_byte = CTR_DEFAULT
        self.status = STATUS_SYSTEM_FLAG | STATUS_NOT_INHIBITED
        self._output: deque[int] = deque()
        self._pending_command: int | None = None  # a command waiting for its data byte
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return (1 << (8 * size)) - 1
        if offset == STATUS_OFFSET:
            full = STATUS_OUTPUT_FULL if self._output else 0
            return self.status | full
        if offset == DATA_OFFSET:
            byte = self._output.popleft() if self._output else 0
            if self._output:
                self._raise()
            return byte
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == STATUS_OFFSET:
            self.status |= STATUS_LAST_WAS_COMMAND
            self._command(value)
        elif offset == DATA_OFFSET:
            self.status &= ~STATUS_LAST_WAS_COMMAND
            command, self._pending_command = self._pending_command, None
            if command == CMD_WRITE_CTR:
                self.command_byte = value
            elif command == CMD_WRITE_OUTPUT_PORT:
                if not value & OUTPUT_PORT_RESET_LINE:
                    self._do_reset()
            elif command == CMD_WRITE_AUX:
                pass  # no mouse: the byte goes nowhere
            else:
                self._keyboard(value)

    def _command(self, command: int) -> None:
        self._pending_command = None
        if command == CMD_READ_CTR:
            self._put(self.command_byte)
        elif command in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_AUX):
            self._pending_command = command
        elif command == CMD_SELF_TEST:
            self._put(SELF_TEST_OK)
        elif command == CMD_TEST_KBD:
            self._put(INTERFACE_OK)
        elif command == CMD_TEST_AUX:
            self._put(AUX_ABSENT)
        elif command == CMD_DISABLE_KBD:
            self.command_byte |= CTR_KBD_DISABLE
        elif command == CMD_ENABLE_KBD:
            self.command_byte &= ~CTR_KBD_DISABLE
        elif command == CMD_DISABLE_AUX:
            self.command_byte |= CTR_AUX_DISABLE
        elif command == CMD_ENABLE_AUX:
            self.command_byte &= ~CTR_AUX_DISABLE
        elif command == CMD_PULSE_RESET:
            self._do_reset()
        # Anything else (LEDs, A20 gates ...) is accepted and ignored.

    def _keyboard(self, byte: int) -> None:
        """A byte for the keyboard itself: acknowledge it like an idle AT keyboard."""
        self._put(KBD_ACK)
        if byte == KBD_RESET:
            self._put(KBD_SELF_TEST_PASSED)

    def _put(self, byte: int) -> None:
        if len(self._output) < OUTPUT_BUFFER_MAX:
            self._output.append(byte)
            self._raise()

    def _raise(self) -> None:
        if self.command_byte & CTR_KBD_INT:
            try:
                self._trigger()
            except OSError:
                pass

    def _do_reset(self) -> None:
        self.resets += 1
        self._reset()

    def stats(self) -> dict[str, int]:
        return {"resets": self.resets}

    _STATE_KEYS = ("command_byte", "status", "output", "pending_command", "resets")

    def state(self) -> dict:
        return {"command_byte": self.command_byte, "status": self.status, "output": bytes(self._output),
                "pending_command": self._pending_command, "resets": self.resets}

    @classmethod
    def from_state(cls, state: object, reset: Callable[[], None] | None = None,
                   trigger: Callable[[], None] | None = None) -> "I8042":
        expect_keys(state, cls._STATE_KEYS, "i8042")
        i8042 = cls(reset, trigger)
        i8042.command_byte = expect_uint(state["command_byte"], 8, "i8042 command byte")
        i8042.status = expect_uint(state["status"], 8, "i8042 status")
        i8042._output.extend(expect_bytes(state["output"], OUTPUT_BUFFER_MAX, "i8042 output"))
        pending = state["pending_command"]
        i8042._pending_command = None if pending is None else expect_uint(pending, 8, "i8042 pending command")
        i8042.resets = expect_uint(state["resets"], 64, "i8042 resets")
        return i8042
