"""Rebuild the shipped BPF objects from their sources: ``python -m crypto_tracer.bpf.build``.

``--check`` rebuilds into a temporary directory and fails if any shipped object differs
from its source (CI runs this). Objects are compiled with clang into CO-RE ELF files;
``-g`` keeps the BTF that CO-RE needs, and debug line info is stripped for reproducibility.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ARCH = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), "x86")


def find_clang() -> str:
    for name in (os.environ.get("CLANG", ""), "clang-16", "clang"):
        if name and shutil.which(name):
            return name
    sys.exit("clang not found: apt-get install clang-16 (only needed to rebuild the BPF objects)")


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "*.bpf.c")))


def compile_one(clang: str, src: str, out_dir: str) -> str:
    out = os.path.join(out_dir, os.path.basename(src)[:-2] + ".o")
    cmd = [clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{ARCH}", "-I", HERE,
           "-fdebug-prefix-map=" + HERE + "=.", "-Wall", "-Wno-unused-function", "-c", src, "-o", out]
    subprocess.run(cmd, check=True, cwd=HERE)
    strip = shutil.which("llvm-strip-16") or shutil.which("llvm-strip")
    if strip:  # drop DWARF (keeps .BTF/.BTF.ext): smaller and independent of the build path
        subprocess.run([strip, "-g", out], check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if shipped objects do not match their sources")
    args = ap.parse_args()
    clang = find_clang()
    if not args.check:
        for src in sources():
            print("built", os.path.relpath(compile_one(clang, src, HERE)))
        return 0
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources():
            built = compile_one(clang, src, tmp)
            shipped = os.path.join(HERE, os.path.basename(built))
            if not os.path.exists(shipped) or not filecmp.cmp(built, shipped, shallow=False):
                stale.append(os.path.basename(shipped))
    if stale:
        print("stale BPF objects (run python -m crypto_tracer.bpf.build):", ", ".join(stale), file=sys.stderr)
        return 1
    print(f"BPF objects match their sources ({len(sources())} checked)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
