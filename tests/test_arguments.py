"""Sizes and output files as every subcommand checks them."""

import argparse
import math
import os
import re

import pytest

from mpvmm.arguments import check_number, check_writable, format_size, number_problem, parse_number, parse_size
from mpvmm.errors import UsageError


@pytest.mark.parametrize("text, size", [
    ("4096", 4096), ("256M", 256 << 20), ("2g", 2 << 30), ("1GiB", 1 << 30), (" 64 KB ", 64 << 10), ("1T", 1 << 40),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [
    ("banana", "invalid size"), ("-1M", "invalid size"), ("0", "not a positive multiple"),
    ("1000", "not a positive multiple of 4096"), ("1P", "invalid size"),
])
def test_bad_sizes(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_size(text)


def test_writable_files_are_checked_without_creating_anything(tmp_path):
    existing = tmp_path / "console.log"
    existing.write_text("kept\n")
    check_writable(str(existing), "--console")
    check_writable(str(tmp_path / "new.json"), "--report", replaced=True)
    check_writable("/dev/full", "--console")
    assert os.listdir(tmp_path) == ["console.log"] and existing.read_text() == "kept\n"


@pytest.mark.parametrize("path, reason", [
    ("{tmp}/missing/out.json", "No such file or directory"),
    ("{tmp}", "Is a directory"),
    ("{tmp}/file/out.json", "Not a directory"),
    ("/proc/nope/x", "No such file or directory"),
    ("/proc/out.json", "No such file or directory"),  # procfs takes no new file, even from root
])
def test_unwritable_files_are_named_with_the_reason(path, reason, tmp_path):
    (tmp_path / "file").write_text("")
    path = path.format(tmp=tmp_path)
    with pytest.raises(UsageError, match=f"^--json {re.escape(path)}: {reason}$"):
        check_writable(path, "--json", replaced=True)
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("text, low, high, low_allowed, value", [
    ("0", 0, 10, True, 0.0), ("10", 0, 10, True, 10.0), ("0.25", 0, 10, False, 0.25), ("1e-9", 0, 1, False, 1e-9),
])
def test_durations_in_range(text, low, high, low_allowed, value):
    assert parse_number(low, high, low_allowed=low_allowed)(text) == value


@pytest.mark.parametrize("text, low_allowed, message", [
    ("nan", True, "from 0 to 3600, not nan"), ("NaN", False, "above 0 and at most 3600, not nan"),
    ("inf", True, "not inf"), ("-inf", True, "not -inf"), ("infinity", True, "not inf"),
    ("-1", True, "not -1"), ("-0.5", True, "not -0.5"), ("0", False, "above 0 and at most 3600, not 0"),
    ("3600.5", True, "not 3600.5"), ("1e300", True, "not 1e+300"),
    ("soon", True, "invalid number of seconds 'soon'"), ("", True, "invalid number of seconds ''"),
])
def test_durations_out_of_range_or_not_numbers(text, low_allowed, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        parse_number(0, 3600, low_allowed=low_allowed)(text)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 1e300])
def test_a_duration_given_in_code_is_checked_the_same_way(value):
    with pytest.raises(UsageError, match=r"^--seconds must be a number of seconds from 0 to 10, not "):
        check_number(value, "--seconds", 0, 10)
    assert number_problem(value, 0, 10) is not None


@pytest.mark.parametrize("size, text", [
    (4096, "4 KiB"), (256 << 20, "256 MiB"), (3 << 29, "1536 MiB"), (1 << 30, "1 GiB"), (1 << 40, "1 TiB"),
    ((2 << 20) + (16 << 10), "2064 KiB"), (12345, "12345 bytes"), (0, "0 bytes"),
])
def test_sizes_are_printed_exactly(size, text):
    assert format_size(size) == text
