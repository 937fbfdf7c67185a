"""Raw mode for guest input, and the terminal given back as it was on every path."""

import os
import termios

import pytest

from mpvmm.supervisor.terminal import RawTerminal


@pytest.fixture
def pty():
    leader, follower = os.openpty()
    yield follower
    os.close(leader)
    os.close(follower)


def test_raw_inside_restored_after(pty):
    before = termios.tcgetattr(pty)
    with RawTerminal(pty) as terminal:
        assert terminal.active
        lflag = termios.tcgetattr(pty)[3]
        assert not lflag & termios.ICANON and not lflag & termios.ECHO  # keys go to the guest as typed
        assert lflag & termios.ISIG  # Ctrl-C still stops the VM
    assert termios.tcgetattr(pty) == before


def test_restored_when_the_run_fails(pty):
    before = termios.tcgetattr(pty)
    with pytest.raises(RuntimeError):
        with RawTerminal(pty):
            raise RuntimeError("the VM failed")
    assert termios.tcgetattr(pty) == before


def test_a_pipe_is_left_alone():
    read_end, write_end = os.pipe()
    try:
        with RawTerminal(read_end) as terminal:
            assert not terminal.active
    finally:
        os.close(read_end)
        os.close(write_end)
