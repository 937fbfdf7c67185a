"""Sizes and output files as every subcommand checks them."""

import argparse
import math
import re

import pytest

from mpvmm.arguments import check_seconds, check_writable, parse_seconds, parse_size, seconds_problem
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


def test_writable_file_is_created_and_an_unwritable_one_named(tmp_path):
    check_writable(str(tmp_path / "report.json"), "--report")
    assert (tmp_path / "report.json").exists()
    with pytest.raises(UsageError, match=r"^--json .*/missing/out.json: No such file or directory$"):
        check_writable(str(tmp_path / "missing" / "out.json"), "--json")


@pytest.mark.parametrize("text, low, high, low_allowed, value", [
    ("0", 0, 10, True, 0.0), ("10", 0, 10, True, 10.0), ("0.25", 0, 10, False, 0.25), ("1e-9", 0, 1, False, 1e-9),
])
def test_durations_in_range(text, low, high, low_allowed, value):
    assert parse_seconds(low, high, low_allowed=low_allowed)(text) == value


@pytest.mark.parametrize("text, low_allowed, message", [
    ("nan", True, "from 0 to 3600, not nan"), ("NaN", False, "above 0 and at most 3600, not nan"),
    ("inf", True, "not inf"), ("-inf", True, "not -inf"), ("infinity", True, "not inf"),
    ("-1", True, "not -1"), ("-0.5", True, "not -0.5"), ("0", False, "above 0 and at most 3600, not 0"),
    ("3600.5", True, "not 3600.5"), ("1e300", True, "not 1e+300"),
    ("soon", True, "invalid number of seconds 'soon'"), ("", True, "invalid number of seconds ''"),
])
def test_durations_out_of_range_or_not_numbers(text, low_allowed, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        parse_seconds(0, 3600, low_allowed=low_allowed)(text)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 1e300])
def test_a_duration_given_in_code_is_checked_the_same_way(value):
    with pytest.raises(UsageError, match=r"^--seconds must be a number of seconds from 0 to 10, not "):
        check_seconds(value, "--seconds", 0, 10)
    assert seconds_problem(value, 0, 10) is not None
