"""load_elf against real guest memory: the built-in guest, and images that must be refused."""

import io
import random
import shutil
import struct
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from mpvmm.errors import GuestLoadError
from mpvmm.guest.abi import builtin_guest_path
from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.x86 import layout
from mpvmm.x86.loader import LoadedImage, load_elf

MEMORY_SIZE = 4 * layout.MIB
WHAT = "test image"

# ELF64 header and program header field offsets (the System V gABI).
EI_CLASS = 4
E_MACHINE = 18
E_PHOFF = 32
PHDR_SIZE = 56
P_TYPE, P_OFFSET, P_PADDR, P_FILESZ, P_MEMSZ = 0, 8, 24, 32, 40
PT_NOTE = 4
EM_AARCH64 = 183


@pytest.fixture
def memory():
    memory = GuestMemory(MEMORY_SIZE)
    yield memory
    memory.close()


@pytest.fixture(scope="module")
def guest_image():
    return builtin_guest_path().read_bytes()


def _load_segments(image):
    elf = ELFFile(io.BytesIO(image))
    return [
        (s["p_offset"], s["p_paddr"], s["p_filesz"], s["p_memsz"])
        for s in elf.iter_segments()
        if s["p_type"] == "PT_LOAD"
    ], elf["e_entry"], elf["e_phoff"]


def _first_load_phdr(image):
    """File offset of the builtin guest's first PT_LOAD program header."""
    _, _, phoff = _load_segments(image)
    (p_type,) = struct.unpack_from("<I", image, phoff)
    assert p_type == 1  # PT_LOAD comes first in the built-in guest
    return phoff


def _patched(image, offset, fmt, value):
    patched = bytearray(image)
    struct.pack_into(fmt, patched, offset, value)
    return bytes(patched)


def _assert_refused(memory, image, *words):
    with pytest.raises(GuestLoadError) as info:
        load_elf(memory, image, WHAT)
    message = str(info.value)
    assert WHAT in message
    for word in words:
        assert word in message
    assert "\n" not in message
    return message


# --- The built-in guest loads where its program headers say. ---


def test_builtin_guest_lands_at_its_physical_addresses(memory, guest_image):
    segments, entry, _ = _load_segments(guest_image)
    assert segments, "the built-in guest has a PT_LOAD segment"
    loaded = load_elf(memory, guest_image, "built-in guest")
    assert isinstance(loaded, LoadedImage)
    assert loaded.entry == entry == layout.GUEST_CODE_ADDR
    for offset, paddr, filesz, memsz in segments:
        assert memory.read(paddr, filesz) == guest_image[offset : offset + filesz]
        assert memory.read(paddr + filesz, memsz - filesz) == bytes(memsz - filesz)
    assert loaded.low == min(paddr for _, paddr, _, _ in segments)
    assert loaded.high == max(paddr + memsz for _, paddr, _, memsz in segments)


def test_bss_part_of_a_segment_is_zeroed(memory, guest_image):
    phdr = _first_load_phdr(guest_image)
    offset, paddr, filesz, _ = _load_segments(guest_image)[0][0]
    memsz = filesz + 0x2000
    image = _patched(guest_image, phdr + P_MEMSZ, "<Q", memsz)
    memory.write(paddr, b"\xaa" * (memsz + 16))  # stale contents the loader must clear
    loaded = load_elf(memory, image, WHAT)
    assert memory.read(paddr, filesz) == guest_image[offset : offset + filesz]
    assert memory.read(paddr + filesz, memsz - filesz) == bytes(memsz - filesz)
    assert memory.read(paddr + memsz, 16) == b"\xaa" * 16  # and not one byte further
    assert loaded.high == paddr + memsz


# --- Bad input: GuestLoadError with a clear message, nothing else. ---


def test_empty_file_is_refused(memory):
    _assert_refused(memory, b"", "not a valid ELF")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_refused(memory, seed):
    _assert_refused(memory, random.Random(seed).randbytes(4096), "not a valid ELF")


def test_text_file_is_refused(memory):
    _assert_refused(memory, b"#!/bin/sh\necho hello\n" * 10)


# Cuts inside the ELF header and the program headers (the built-in guest's
# first 64 + 2 * 56 = 176 bytes).
@pytest.mark.parametrize("length", [1, 4, 5, 16, 17, 24, 52, 63, 64, 65, 100, 119, 120, 121, 150, 175])
def test_truncated_headers_are_refused(memory, guest_image, length):
    _, _, phoff = _load_segments(guest_image)
    assert length < phoff + 2 * PHDR_SIZE
    _assert_refused(memory, guest_image[:length])


def test_truncated_segment_data_is_refused(memory, guest_image):
    segments, _, _ = _load_segments(guest_image)
    offset, _, filesz, _ = segments[0]
    cuts = [176, offset, offset + 1, offset + filesz // 2, offset + filesz - 1]
    accepted = []
    for length in cuts:
        try:
            load_elf(memory, guest_image[:length], WHAT)
        except GuestLoadError:
            continue
        accepted.append(length)
    assert accepted == [], f"truncated images of these lengths loaded: {accepted}"


@pytest.mark.parametrize("field", ["p_offset", "e_phoff"])
def test_huge_file_offset_is_refused(memory, guest_image, field):
    phdr = _first_load_phdr(guest_image)
    at = phdr + P_OFFSET if field == "p_offset" else E_PHOFF
    _assert_refused(memory, _patched(guest_image, at, "<Q", 1 << 63))


def test_32_bit_elf_by_class_byte_is_refused(memory, guest_image):
    image = bytearray(guest_image)
    image[EI_CLASS] = 1  # ELFCLASS32
    _assert_refused(memory, bytes(image), "not a 64-bit x86 ELF")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_32_bit_elf_from_gcc_is_refused(memory, tmp_path):
    source = tmp_path / "f.c"
    source.write_text("int f(void) { return 1; }\n")
    obj = tmp_path / "f.o"
    built = subprocess.run(["gcc", "-m32", "-c", str(source), "-o", str(obj)], capture_output=True)
    if built.returncode != 0:
        pytest.skip(f"gcc -m32 unavailable: {built.stderr.decode()[-200:]}")
    image = obj.read_bytes()
    assert image[EI_CLASS] == 1
    _assert_refused(memory, image, "not a 64-bit x86 ELF")


def test_64_bit_elf_for_another_machine_is_refused(memory, guest_image):
    _assert_refused(memory, _patched(guest_image, E_MACHINE, "<H", EM_AARCH64), "not a 64-bit x86 ELF")


def test_elf_without_loadable_segment_is_refused(memory, guest_image):
    image = _patched(guest_image, _first_load_phdr(guest_image) + P_TYPE, "<I", PT_NOTE)
    _assert_refused(memory, image, "no loadable segment")


@pytest.mark.parametrize(
    "paddr",
    [
        MEMORY_SIZE,  # just past the end of RAM
        MEMORY_SIZE - 0x100,  # starts in RAM, ends past it
        layout.MMIO_HOLE_START + 0x1000,  # in the MMIO hole
        (1 << 64) - 0x100,  # wraps around the address space
    ],
)
def test_segment_outside_guest_memory_is_refused(memory, guest_image, paddr):
    image = _patched(guest_image, _first_load_phdr(guest_image) + P_PADDR, "<Q", paddr)
    message = _assert_refused(memory, image, "does not fit guest memory")
    assert f"{paddr:#x}" in message
    assert memory.read(layout.GUEST_CODE_ADDR, 64) == bytes(64)  # nothing was written


def test_segment_with_filesz_above_memsz_is_refused(memory, guest_image):
    phdr = _first_load_phdr(guest_image)
    _, _, filesz, _ = _load_segments(guest_image)[0][0]
    _assert_refused(memory, _patched(guest_image, phdr + P_MEMSZ, "<Q", filesz - 1))
