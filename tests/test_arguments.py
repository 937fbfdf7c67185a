"""Sizes and output files as every subcommand checks them."""

import argparse

import pytest

from mpvmm.arguments import check_writable, parse_size
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
