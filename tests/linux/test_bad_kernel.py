"""Bad kernels, initrds and command lines: one line on stderr, exit 2, nothing leaked."""

import os
import subprocess
import sys

import pytest

from tests.x86.bzimage_fixtures import compress, make_bzimage, tiny_elf

MPVMM = [sys.executable, "-m", "mpvmm", "start", "--no-metrics"]


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


CASES = {
    "missing": (lambda t: "/nonexistent/bzImage", [], "kernel /nonexistent/bzImage: No such file"),
    "empty": (lambda t: _write(t, "empty", b""), [], "is empty"),
    "random": (lambda t: _write(t, "random", os.urandom(65536)), [], "not a Linux kernel"),
    "truncated": (lambda t: _write(t, "trunc", make_bzimage(compress(tiny_elf(), "xz"))[:2100]), [],
                  "truncated"),
    "old-protocol": (lambda t: _write(t, "old", make_bzimage(compress(tiny_elf(), "gzip"), version=0x0204)),
                     [], "boot protocol 2.04"),
    "larger-than-memory": (lambda t: _write(t, "big", make_bzimage(os.urandom(40 << 20))),
                           ["--memory", "32M"], "larger than guest memory"),
    "initrd-larger-than-memory": (lambda t: _write(t, "k", make_bzimage(compress(tiny_elf(), "gzip"))),
                                  ["--memory", "32M", "--initrd", "BIGINITRD"], "initrd"),
    "initrd-missing": (lambda t: _write(t, "k", make_bzimage(compress(tiny_elf(), "gzip"))),
                       ["--initrd", "/nonexistent/initrd"], "initrd /nonexistent/initrd: No such file"),
    "cmdline-too-long": (lambda t: _write(t, "k", make_bzimage(compress(tiny_elf(), "gzip"), cmdline_size=255)),
                         ["--cmdline", "x" * 256], "at most 255"),
    "memory-too-small": (lambda t: _write(t, "k", make_bzimage(compress(tiny_elf(), "gzip"))),
                         ["--memory", "16M"], "too small to boot Linux"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_kernel_input_is_one_line_and_exit_2(case, tmp_path, no_leaks):
    make_kernel, extra, message = CASES[case]
    kernel = make_kernel(tmp_path)
    if "BIGINITRD" in extra:
        extra = [str(tmp_path / "initrd") if a == "BIGINITRD" else a for a in extra]
        with open(tmp_path / "initrd", "wb") as f:
            f.truncate(33 << 20)
    process = subprocess.run([*MPVMM, "--kernel", kernel, *extra], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    assert process.returncode == 2, process.stderr
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], process.stderr
    assert lines[0].startswith("mpvmm: error:")


def test_initrd_and_cmdline_need_a_kernel(no_leaks):
    process = subprocess.run([*MPVMM, "--cmdline", "quiet"], capture_output=True, text=True, timeout=60)
    assert process.returncode == 2 and "need --kernel" in process.stderr
