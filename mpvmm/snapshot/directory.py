"""A snapshot on disk: a directory with the machine state and guest RAM (docs/snapshot.md).

    DIR/state.mpvmm   records (records.py): snapshot header, machine, one per
                      vCPU, VM, one per device, end (record count, RAM size
                      and checksum)
    DIR/memory.raw    guest RAM, byte for byte at its offset; pages of zeros
                      are holes, never written

``write`` fills a new (or empty) directory and leaves nothing behind if it
fails; the state file is renamed into place last, so a directory without it
is not a snapshot. ``read`` checks everything a restore will rely on before
the caller creates anything: the format version, every record's checksum
and order, the memory file's size and the checksum of its contents.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref

from mpvmm import __version__
from mpvmm.errors import SnapshotError, StateError
from mpvmm.output import write_new_file
from mpvmm.snapshot import records
from mpvmm.snapshot.machine_state import MachineState
from mpvmm.snapshot.ram import data_runs, runs_checksum, view
from mpvmm.supervisor.guest_memory import map_shared, unmap

FORMAT = "mpvmm-snapshot"
VERSION = 1
STATE_FILE = "state.mpvmm"
MEMORY_FILE = "memory.raw"
MAX_STATE_FILE = 64 << 20  # a 1024-vCPU machine's state is about 8 MiB


def check_target(path: str) -> None:
    """Refuse a place a snapshot cannot go, before the VM's state is read."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise SnapshotError(f"snapshot directory {path} already exists and is not empty")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SnapshotError(f"cannot create snapshot directory {path}: {parent} is not a writable directory")


def write(path: str, state: MachineState, memory) -> dict:
    """Save ``state`` and ``memory`` (a paused VM's guest RAM) as a new snapshot at ``path``.

    Returns what was written: sizes, the checksum, how long it took.
    SnapshotError if it cannot; nothing is left then.
    """
    started = time.monotonic()
    created = _make_directory(path)
    try:
        memory_path = os.path.join(path, MEMORY_FILE)
        runs = list(data_runs(memory.fd, memory.host_address, memory.size))
        written = _write_memory(memory_path, runs, memory)
        checksum = runs_checksum(runs, memory.host_address)
        items = [(records.SNAPSHOT, {"format": FORMAT, "version": VERSION, "mpvmm": __version__,
                                     "created": time.time()})] + state.to_records()
        items.append((records.END, {"records": len(items), "memory_size": memory.size,
                                    "memory_checksum": checksum}))
        temporary = os.path.join(path, STATE_FILE + ".partial")
        write_new_file(temporary, b"".join(records.pack(kind, payload) for kind, payload in items), 0o600)
        os.rename(temporary, os.path.join(path, STATE_FILE))
        _fsync_directory(path)
    except OSError as err:
        _remove(path, created)
        raise SnapshotError(f"cannot write snapshot {path}: {err.strerror}") from err
    except BaseException:
        _remove(path, created)
        raise
    return {"dir": os.path.abspath(path), "memory_bytes": memory.size, "memory_written_bytes": written,
            "memory_checksum": checksum, "seconds": time.monotonic() - started}


def _make_directory(path: str) -> bool:
    """Create ``path`` (0700), or accept it empty; True when we created it."""
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        if os.path.isdir(path) and not os.listdir(path):
            return False
        raise SnapshotError(f"snapshot directory {path} already exists and is not empty") from None
    except OSError as err:
        raise SnapshotError(f"cannot create snapshot directory {path}: {err.strerror}") from err


def _write_memory(memory_path: str, runs, memory) -> int:
    fd = os.open(memory_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    written = 0
    try:
        os.ftruncate(fd, memory.size)  # the holes: every page not written below reads as zeros
        for offset, length in runs:
            data = view(memory.host_address + offset, length)
            while data:
                done = os.pwrite(fd, data, offset)
                data, offset, written = data[done:], offset + done, written + done
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str, created: bool) -> None:
    for name in (MEMORY_FILE, STATE_FILE, STATE_FILE + ".partial"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, name))
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(path)


class Snapshot:
    """A snapshot that passed every check: its state, and its memory file mapped read-only.

    The mapping goes with ``close`` (after ``copy_into``), or with the object.
    """

    def __init__(self, path: str, state: MachineState, memory_address: int, memory_size: int):
        self.path = path
        self.state = state
        self.memory_address = memory_address
        self.memory_size = memory_size
        self.runs: list[tuple[int, int]] = []
        self._unmap = weakref.finalize(self, unmap, memory_address, memory_size)

    def copy_into(self, memory) -> None:
        """Guest RAM as it was saved (``memory`` is fresh, so all zeros), then unmap the file."""
        for offset, length in self.runs:
            view(memory.host_address + offset, length)[:] = view(self.memory_address + offset, length)
        self.close()

    def close(self) -> None:
        self._unmap()
        self.memory_address = 0


def read(path: str) -> Snapshot:
    """Open and check the snapshot at ``path``; SnapshotError names the first thing wrong."""
    try:
        return _read(path)
    except StateError as err:
        raise SnapshotError(f"snapshot {path}: {err}") from None
    except OSError as err:
        raise SnapshotError(f"snapshot {path}: {err.filename or path}: {err.strerror}") from None


def _read(path: str) -> Snapshot:
    state_path = os.path.join(path, STATE_FILE)
    with open(state_path, "rb") as f:
        data = f.read(MAX_STATE_FILE + 1)
    if len(data) > MAX_STATE_FILE:
        raise StateError(f"{STATE_FILE} is larger than any snapshot's ({MAX_STATE_FILE} bytes)")
    items = records.parse(data)
    if not items or items[0][0] != records.SNAPSHOT or items[0][1].get("format") != FORMAT:
        raise StateError(f"{STATE_FILE} is not an mpvmm snapshot")
    version = items[0][1].get("version")
    if version != VERSION:
        raise StateError(f"snapshot format version {version!r} (written by mpvmm {items[0][1].get('mpvmm')}); "
                         f"this mpvmm {__version__} reads version {VERSION} only")
    if items[-1][0] != records.END:
        raise StateError(f"truncated: {STATE_FILE} has no end record")
    end = items[-1][1]
    if end.get("records") != len(items) - 1:
        raise StateError(f"the end record counts {end.get('records')!r} records, the file has {len(items) - 1}")
    state = MachineState.from_records(items[1:-1])
    if end.get("memory_size") != state.machine["memory"]:
        raise StateError(f"the end record's RAM size {end.get('memory_size')!r} is not the machine's")
    snapshot = _map_memory(path, state)
    try:
        checksum = runs_checksum(snapshot.runs, snapshot.memory_address)
        if checksum != end.get("memory_checksum"):
            raise StateError(f"{MEMORY_FILE} does not hold the RAM that was saved (checksum {checksum:#010x}, "
                             f"saved {end.get('memory_checksum')!r}): corrupt")
    except BaseException:
        snapshot.close()
        raise
    return snapshot


def _map_memory(path: str, state: MachineState) -> Snapshot:
    size = state.machine["memory"]
    fd = os.open(os.path.join(path, MEMORY_FILE), os.O_RDONLY | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise StateError(f"{MEMORY_FILE} is {actual} bytes; the machine has {size} bytes of RAM")
        address = map_shared(fd, size, writable=False)
        snapshot = Snapshot(path, state, address, size)
        snapshot.runs = list(data_runs(fd, address, size))
    finally:
        os.close(fd)
    return snapshot
