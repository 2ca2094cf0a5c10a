"""C compilers for the native targets: which compiler and flags, and errors a user can act on.

    native          the system compiler (cc), -march=native: AVX-512 / AVX2 / NEON as this CPU has
    aarch64-linux   Debian's cross compiler, ARMv8.2-A with the dot-product extension; runs here
                    under qemu-aarch64 (qemu-user) with the cross libraries' sysroot
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ...errors import EdgeLLMError

KERNELS = Path(__file__).parent / "kernels"
LIBRARY_SOURCES = ("edgellm_kernels.c", "edgellm_integer.c", "edgellm_amx.c", "edgellm_encoder.c", "edgellm_runtime.c")


@dataclass(frozen=True)
class Toolchain:
    target: str
    compiler: str
    arch_flags: tuple[str, ...]
    package: str  # the Debian package that provides the compiler
    emulator: tuple[str, ...] = ()  # how to run its programs on this machine, if not natively

    def find(self) -> str:
        path = shutil.which(self.compiler)
        if path is None:
            raise EdgeLLMError(f"target {self.target}: no C compiler '{self.compiler}' found; install it "
                               f"(Debian/Ubuntu: apt-get install {self.package})")
        return path

    def runner(self) -> list[str]:
        """The command prefix that runs this target's programs here ([] when native)."""
        if self.emulator and shutil.which(self.emulator[0]) is None:
            raise EdgeLLMError(f"target {self.target}: '{self.emulator[0]}' is needed to run its programs here "
                               "(Debian/Ubuntu: apt-get install qemu-user)")
        return list(self.emulator)


TOOLCHAINS = {
    "native": Toolchain("native", "cc", ("-march=native",), "gcc"),
    "aarch64-linux": Toolchain("aarch64-linux", "aarch64-linux-gnu-gcc", ("-march=armv8.2-a+dotprod",),
                               "gcc-aarch64-linux-gnu", ("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu")),
}
FLAGS = ("-O3", "-std=gnu11", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function")


def build_programs(toolchain: Toolchain, directory: Path) -> None:
    """Compile directory/model.c with the kernels into libmodel.so and model_main, with the
    settings in directory/program.json the kernels read (kernel_defines). Each is
    written to a temporary name and renamed into place only when it compiled; a failure raises,
    so the build stays incomplete and --resume retries it (a program left from an earlier build
    refuses the new weights file: their digests differ)."""
    compiler = toolchain.find()
    sources = [str(directory / "model.c")] + [str(KERNELS / s) for s in LIBRARY_SOURCES]
    program = directory / "program.json"
    defines = kernel_defines(json.loads(program.read_text())) if program.is_file() else []
    common = [compiler, *FLAGS, *toolchain.arch_flags, *defines, f"-I{KERNELS}"]
    outputs = {
        "libmodel.so": [*common, "-shared", "-fPIC", *sources, "-o"],
        "model_main": [*common, str(KERNELS / "model_main.c"), *sources, "-o"],
    }
    for name, command in outputs.items():
        tmp = directory / f".{name}.tmp{os.getpid()}"
        result = subprocess.run([*command, str(tmp), "-lm"], capture_output=True, text=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise EdgeLLMError(f"{toolchain.target}: compiling {name} failed: {_first_error(result.stderr)}")
        tmp.replace(directory / name)


def _die_with_parent() -> None:
    """In the compiler's process, before it starts: the kernel kills it when the build dies, even
    by kill -9, instead of leaving it to run on (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def kernel_defines(program: dict) -> list[str]:
    """The -D options a program's settings (program.json) compile the kernels with."""
    return ["-DEM_KV_FLOAT16"] if program.get("kv_cache_dtype") == "float16" else []


def _first_error(stderr: str) -> str:
    """The compiler's or linker's first error line (file:line: error: ..., which names the
    generated file), or the last line if none matches."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in (": error:", "fatal error", "relocation", "undefined reference"):
        for line in lines:
            if marker in line:
                return line
    return lines[-1] if lines else "no message"
