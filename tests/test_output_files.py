"""mpvmm/output.py: standard streams that never raise, files replaced whole."""

import os
import subprocess
import sys

import pytest

from mpvmm.output import GuardedStream, names_an_open_file, write_atomically


def test_a_file_is_replaced_whole_with_its_permissions(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    write_atomically(str(path), b"new")
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o640
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_new_file_gets_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_atomically(str(tmp_path / "r.json"), b"{}")
    finally:
        os.umask(previous)
    assert ((tmp_path / "r.json").stat().st_mode & 0o777) == 0o640


def test_a_device_is_written_not_renamed_over():
    write_atomically("/dev/null", b"data")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    write_atomically(str(fifo), b"through the pipe")
    assert reader.communicate(timeout=10)[0] == b"through the pipe"
    assert not fifo.is_file() and os.listdir(tmp_path) == ["pipe"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(TypeError):
        write_atomically(str(tmp_path / "r.json"), "not bytes")
    assert os.listdir(tmp_path) == []


def test_guarded_stream_keeps_the_first_error_and_never_raises():
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = GuardedStream(write_end)
    assert stream.write("lost") == 4 and stream.write("also lost") == 9
    assert isinstance(stream.error, BrokenPipeError)
    os.close(write_end)


def test_standard_fds_closed_at_start_stay_failing_and_are_not_reused():
    """After open_standard_fds a closed stdout fails writes with EBADF, and a new fd is not 1."""
    code = ("import os; from mpvmm.output import open_standard_fds; open_standard_fds(); "
            "fd = os.open('/dev/null', os.O_RDONLY); "
            "err = None\n"
            "try: os.write(1, b'x')\n"
            "except OSError as e: err = e.strerror\n"
            "os.write(2, f'{fd} {err} {os.get_inheritable(1)}'.encode())")
    process = subprocess.run(["bash", "-c", 'exec "$@" >&-', "probe", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=30)
    assert process.stderr == "3 Bad file descriptor True", process.stderr


def test_a_file_named_through_an_open_descriptor_is_appended_to(tmp_path):
    """`--report /dev/stdout > out.json`: renaming over out.json would take it from the shell."""
    path = tmp_path / "out.json"
    with open(path, "wb") as redirected:
        redirected.write(b"summary\n")
        redirected.flush()
        inode = os.fstat(redirected.fileno()).st_ino
        through = f"/proc/self/fd/{redirected.fileno()}"
        assert names_an_open_file(through) and names_an_open_file("/dev/stdout")
        write_atomically(through, b"report\n")
    assert path.read_bytes() == b"summary\nreport\n" and path.stat().st_ino == inode


def test_ordinary_paths_and_links_are_not_open_file_names(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    assert not names_an_open_file(str(link)) and not names_an_open_file("/dev/null")
