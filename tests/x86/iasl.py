"""ACPICA's iasl, the reference ACPI toolchain, as the tests' second opinion on our tables.

``disassemble`` runs ``iasl -d`` on a table and returns the .dsl text (a data
table's fields by name, or a DSDT as ASL); ``compile_asl`` compiles ASL back
to AML with optimizations off (``-oa``), so its bytes can be compared with
ours. scripts/test.sh installs acpica-tools; without iasl these tests fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

HEADER_SIZE = 36


def _iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        pytest.fail("iasl is missing: install Debian's acpica-tools (scripts/test.sh does)")
    return path


def _run(args: list[str], folder: str) -> str:
    result = subprocess.run([_iasl(), *args], cwd=folder, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def disassemble(table: bytes, folder: str, name: str) -> str:
    """``iasl -d`` of ``table``; fails if iasl does, or finds the checksum wrong."""
    data = os.path.join(folder, f"{name}.dat")
    with open(data, "wb") as f:
        f.write(table)
    _run(["-d", data], folder)
    with open(os.path.join(folder, f"{name}.dsl")) as f:
        dsl = f.read()
    assert "Incorrect checksum" not in dsl, dsl[:3000]
    return dsl


def compile_asl(asl: str, folder: str, name: str) -> bytes:
    """The AML iasl makes of ``asl``, optimizations off (``-oa``), header included."""
    source = os.path.join(folder, f"{name}.asl")
    with open(source, "w") as f:
        f.write(asl)
    _run(["-oa", "-p", os.path.join(folder, f"{name}-recompiled"), source], folder)
    with open(os.path.join(folder, f"{name}-recompiled.aml"), "rb") as f:
        return f.read()


def fields(dsl: str, name: str) -> list[str]:
    """Every value of a data table field as iasl prints it: ``[off dec len]  Name : value``."""
    return [value.strip() for value in
            re.findall(rf"^\[[^\]]*\]\s+{re.escape(name)} : (.*)$", dsl, re.MULTILINE)]


def field(dsl: str, name: str) -> str:
    """The first value of a field."""
    values = fields(dsl, name)
    assert values, f"no field {name!r} in the disassembly"
    return values[0]


def flag(dsl: str, name: str) -> int:
    """A decoded flag bit's value, from the lines iasl prints under a flags field."""
    match = re.search(rf"^\s+{re.escape(name)} : (\d)$", dsl, re.MULTILINE)
    assert match, f"no flag {name!r} in the disassembly"
    return int(match.group(1))
