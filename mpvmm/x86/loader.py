"""Loading ELF images into guest memory (pyelftools reads the headers)."""

import io
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from mpvmm.errors import GuestLoadError
from mpvmm.x86.layout import GuestAddress


@dataclass(frozen=True)
class LoadedImage:
    """Where an image landed: its entry point and the guest range it covers."""

    entry: GuestAddress
    low: GuestAddress
    high: GuestAddress  # one past the last byte


def load_elf(memory, image: bytes, what: str = "image") -> LoadedImage:
    """Copy every PT_LOAD segment of a 64-bit x86 ELF to its physical address."""
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise GuestLoadError(f"{what} is not a 64-bit x86 ELF file")
        segments = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        if not segments:
            raise GuestLoadError(f"{what} has no loadable segment")
        low, high = None, 0
        for segment in segments:
            address, filesz, memsz = segment["p_paddr"], segment["p_filesz"], segment["p_memsz"]
            if segment["p_offset"] + filesz > len(image):
                raise GuestLoadError(
                    f"{what}: segment at {address:#x} extends past the end of the file (truncated?)"
                )
            if filesz > memsz or not memory.contains(address, memsz):
                raise GuestLoadError(
                    f"{what}: segment at {address:#x} ({memsz} bytes) does not fit guest memory"
                )
            memory.write(address, segment.data()[:filesz])
            memory.write(address + filesz, bytes(memsz - filesz))
            low = address if low is None else min(low, address)
            high = max(high, address + memsz)
        return LoadedImage(GuestAddress(elf["e_entry"]), GuestAddress(low), GuestAddress(high))
    except (ELFError, OverflowError, ValueError, EOFError) as err:
        # pyelftools seeks wherever the headers say: hostile offsets surface
        # as these rather than as ELFError.
        raise GuestLoadError(f"{what} is not a valid ELF file: {err}") from err
