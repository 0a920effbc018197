"""Builds the host emulator of the tgvkv CUDA kernels (see README.md).

    python tools/cuda_emu/build.py OUT_DIR      # prints the path of the executable

Steps: copy the torch-free kernel headers (csrc/include/tgvkv) into OUT_DIR/include, rewriting
each ``extern __shared__ [__align__(n)] T name[];`` (the dynamic shared memory, which has no C++
equivalent) into ``T* name = reinterpret_cast<T*>(emu_dyn_smem);`` and each launch
``kernel<<<config>>>(args);`` of the launchers (defined in the kernel headers) into
``emu::Launch(config) << [&] { kernel(args); };`` -- the only changes made to the kernel
sources -- then compile emu.cpp against them and the fake CUDA headers in fake/ with
g++ -std=c++17 -O1 -pthread (a few seconds).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KERNELS = REPO / "csrc" / "include" / "tgvkv"

_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)"
    r"\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;")


def rewrite_dynamic_shared(src: str) -> tuple[str, int]:
    """``extern __shared__`` arrays -> pointers to the emulated dynamic shared memory."""
    return _EXTERN_SHARED.subn(
        lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(emu_dyn_smem);", src)


_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<([^;]*?)>>>\(([^;]*?)\);")


def rewrite_launches(src: str) -> tuple[str, int]:
    """``kernel<<<config>>>(args);`` -> ``emu::Launch(config) << [&] { kernel(args); };``."""
    return _LAUNCH.subn(lambda m: f"emu::Launch({m.group(2)}) << [&] {{ {m.group(1)}({m.group(3)}); }};",
                        src)


def stage_headers(out: Path) -> int:
    """Copies csrc/include/tgvkv to out/include/tgvkv with the rewrite; returns the rewrites."""
    dst_root = out / "include" / "tgvkv"
    if dst_root.exists():
        shutil.rmtree(dst_root)
    total = 0
    for src in sorted(KERNELS.rglob("*")):
        if not src.is_file() or src.suffix not in (".h", ".cuh"):
            continue
        text, n = rewrite_dynamic_shared(src.read_text())
        if "extern __shared__" in text:
            raise RuntimeError(f"{src}: an 'extern __shared__' declaration build.py cannot rewrite")
        text, n_launch = rewrite_launches(text)
        if "<<<" in text:
            raise RuntimeError(f"{src}: a kernel launch build.py cannot rewrite")
        total += n + n_launch
        dst = dst_root / src.relative_to(KERNELS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)
    return total


def build(out_dir: str | os.PathLike, cxx: str | None = None, opt: str = "-O1",
          sanitize: bool = False) -> Path:
    """Builds ``out_dir/emu`` and returns its path. Raises CalledProcessError on a compile error
    (with the compiler output in the exception's ``output``). ``sanitize``: with AddressSanitizer
    and UBSan (out-of-bounds global / dynamic shared memory accesses abort; ~3x slower)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage_headers(out)
    exe = out / "emu"
    cmd = [cxx or os.environ.get("CXX", "g++"), "-std=c++17", opt, "-pthread", "-ffp-contract=off",
           "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare", "-Wno-unused-variable",
           "-Wno-unused-but-set-variable",
           f"-I{HERE / 'fake'}", f"-I{out / 'include'}", str(HERE / "emu.cpp"), "-o", str(exe)]
    if sanitize:
        cmd[2:2] = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-fno-omit-frame-pointer"]
    subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return exe


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sanitize"]
    if len(args) != 1:
        sys.exit(f"usage: {sys.argv[0]} [--sanitize] OUT_DIR")
    try:
        print(build(args[0], sanitize="--sanitize" in sys.argv[1:]))
    except subprocess.CalledProcessError as e:
        sys.exit(e.output)
