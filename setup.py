"""Build of the native parts: the run-loop extension, the bench's raw loop and the built-in guest.

The guest is freestanding x86-64 code compiled with the same gcc that builds
the extension, linked at the address layout.py gives it, and shipped in the
package as an ELF that the supervisor loads (mpvmm/x86/loader.py).
"""

import re
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
GUEST_DIR = ROOT / "mpvmm" / "guest"
GUEST_CFLAGS = [
    "-O2", "-Wall", "-Wextra", "-Werror",
    # Freestanding, position-dependent, no SSE: the guest runs at CPL 3 with
    # no runtime, no floating-point state set up and no stack protector.
    "-ffreestanding", "-fno-pic", "-fno-pie", "-no-pie", "-nostdlib", "-static",
    "-mgeneral-regs-only", "-mno-red-zone", "-fno-stack-protector",
    "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
]


def guest_code_address() -> int:
    """GUEST_CODE_ADDR from the layout module, without importing the package."""
    text = (ROOT / "mpvmm" / "x86" / "layout.py").read_text()
    match = re.search(r"^GUEST_CODE_ADDR = GuestAddress\((0x[0-9A-Fa-f]+)\)", text, re.M)
    if not match:
        raise RuntimeError("GUEST_CODE_ADDR not found in mpvmm/x86/layout.py")
    return int(match.group(1), 16)


def build_guest(output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["gcc", *GUEST_CFLAGS,
         "-Wl,-T," + str(GUEST_DIR / "guest.ld"),
         f"-Wl,--defsym=GUEST_CODE_ADDR={guest_code_address():#x}",
         "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments",
         "-o", str(output), str(GUEST_DIR / "entry.S"), str(GUEST_DIR / "builtin.c")],
        check=True,
    )


class BuildWithGuest(build_ext):
    """build_ext that also builds the built-in guest beside the extension."""

    def run(self):
        super().run()
        if self.inplace:
            build_guest(GUEST_DIR / "builtin.elf")
        else:
            build_guest(Path(self.build_lib) / "mpvmm" / "guest" / "builtin.elf")


setup(
    ext_modules=[
        Extension(
            "mpvmm.vcpu_worker._runloop",
            sources=["mpvmm/vcpu_worker/_runloop.c", "mpvmm/vcpu_worker/ring_python.c"],
            depends=["mpvmm/guest/abi.h", "mpvmm/vcpu_worker/outcome.h", "mpvmm/vcpu_worker/ring.h"],
            extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
        ),
        # The bench's reference loop: KVM alone, no routing or stats (mpvmm bench).
        Extension(
            "mpvmm.bench._rawloop",
            sources=["mpvmm/bench/_rawloop.c"],
            depends=["mpvmm/vcpu_worker/outcome.h"],
            extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
        ),
    ],
    cmdclass={"build_ext": BuildWithGuest},
)
