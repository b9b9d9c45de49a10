"""Rebuild the shipped BPF objects from their sources: ``python -m crypto_tracer.bpf.build``.

Objects are compiled with clang into CO-RE ELF files (``-g`` keeps the BTF that CO-RE needs;
DWARF is stripped). The build also writes ``objects.json``: per object the sha256 of its
source and of every local header it includes, a digest of the libbpf headers it used, and the
objdigest of the object (its instructions, maps, symbols, BTF types and CO-RE relocations,
not its path-dependent bytes), plus the clang version.

``--check`` (CI and ``./setup test`` run it) exits 1 when (a) a source or local header differs
from the manifest, (b) a shipped object's digest differs from the manifest, or (c) with clang of
the manifest's major version and the same libbpf headers, a rebuild's digest differs. With
another clang it only proves that every source still compiles, and says so; without clang it
runs (a) and (b) alone.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from crypto_tracer.bpf import objdigest

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "objects.json")
ARCH = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), "x86")
CLANGS = ("clang-16", "clang-19", "clang-18", "clang-17", "clang")  # 16 built the shipped objects
MIN_CLANG = 14  # BPF CO-RE relocations as libbpf 1.x expects them
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
REBUILD = "run python -m crypto_tracer.bpf.build"


def clang_version(clang: str) -> str:
    out = subprocess.run([clang, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "0.0.0"


def major(version: str) -> int:
    return int(version.split(".")[0])


def find_clang() -> str | None:
    """CLANG from the environment, else the first of CLANGS that exists and is >= MIN_CLANG."""
    env = os.environ.get("CLANG")
    if env:
        if not shutil.which(env):
            sys.exit(f"CLANG={env} is not an executable")
        return env
    for name in CLANGS:
        if shutil.which(name) and major(clang_version(name)) >= MIN_CLANG:
            return name
    return None


def find_strip(version: str) -> str | None:
    """llvm-strip of the clang's major version (an unversioned one only if its version matches)."""
    versioned = shutil.which(f"llvm-strip-{major(version)}")
    if versioned:
        return versioned
    plain = shutil.which("llvm-strip")
    if plain and re.search(rf"version {major(version)}\.", subprocess.run(
            [plain, "--version"], capture_output=True, text=True).stdout):
        return plain
    return None


def sources() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.bpf.c")))


def object_name(src: str) -> str:
    return src[:-2] + ".o"


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def local_inputs(src: str) -> dict[str, str]:
    """sha256 of the source and of every header in this directory it includes, transitively."""
    seen, todo = {}, [src]
    while todo:
        name = todo.pop()
        path = os.path.join(HERE, name)
        if name in seen or not os.path.isfile(path):
            continue
        seen[name] = sha256(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            todo += INCLUDE.findall(f.read())
    return dict(sorted(seen.items()))


def flags() -> list[str]:
    # Relative names from a fixed cwd and the prefix maps keep the checkout path out of the object.
    return ["-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{ARCH}", "-I", ".",
            f"-ffile-prefix-map={HERE}=.", "-fdebug-compilation-dir=.", "-Wall", "-Wno-unused-function"]


def libbpf_headers(clang: str, src: str) -> str:
    """Digest of the system headers (libbpf's) that src includes, by file name and content."""
    deps = subprocess.run([clang, *flags(), "-M", src], cwd=HERE, capture_output=True, text=True, check=True).stdout
    paths = [p for p in deps.replace("\\\n", " ").split()[1:] if os.path.isabs(p) and not p.startswith(HERE + os.sep)]
    return hashlib.sha256("".join(f"{os.path.basename(p)} {sha256(p)}\n" for p in sorted(paths)).encode()).hexdigest()


def compile_one(clang: str, strip: str | None, src: str, out_dir: str) -> str:
    out = os.path.join(out_dir, object_name(src))
    subprocess.run([clang, *flags(), "-c", src, "-o", out], check=True, cwd=HERE)
    if strip:  # drop DWARF (keeps .BTF/.BTF.ext): smaller, and the objdigest ignores it anyway
        subprocess.run([strip, "-g", out], check=True)
    return out


def build(clang: str) -> int:
    version = clang_version(clang)
    strip = find_strip(version)
    objects = {}
    for src in sources():
        out = compile_one(clang, strip, src, HERE)
        objects[object_name(src)] = {"inputs": local_inputs(src), "libbpf_headers": libbpf_headers(clang, src),
                                     "digest": objdigest.digest(out)}
        print("built", os.path.relpath(out))
    manifest = {"comment": "written by python -m crypto_tracer.bpf.build, read by its --check",
                "clang": version, "objects": objects}
    with open(MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", os.path.relpath(MANIFEST), f"(clang {version}{'' if strip else ', DWARF not stripped: no llvm-strip'})")
    return 0


def check(clang: str | None) -> int:
    try:
        with open(MANIFEST) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        print(f"stale BPF objects: {os.path.basename(MANIFEST)} is missing ({REBUILD})", file=sys.stderr)
        return 1
    recorded = manifest["objects"]
    stale = []
    for name in sorted({object_name(s) for s in sources()} | recorded.keys()):
        entry = recorded.get(name)
        if entry is None:
            stale.append(f"{name}: never built")
            continue
        now = local_inputs(name[:-2] + ".c")
        changed = sorted(n for n in now.keys() | entry["inputs"].keys() if now.get(n) != entry["inputs"].get(n))
        if changed:  # (a)
            stale.append(f"{name}: {', '.join(changed)} changed since it was built")
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            stale.append(f"{name}: missing")
        elif objdigest.digest(path) != entry["digest"]:  # (b)
            stale.append(f"{name}: object differs from the one the manifest recorded")
    if not stale:  # (c) only matters when the sources and objects agree with the manifest
        rebuilt, note = rebuild(clang, manifest, stale)
    if stale:
        print(f"stale BPF objects ({REBUILD}):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print(f"BPF objects match their sources ({len(recorded)} checked: sources, headers, objects{rebuilt})")
    if note:
        print(note)
    return 0


def rebuild(clang: str | None, manifest: dict, stale: list[str]) -> tuple[str, str]:
    """(c): rebuild into a temporary directory; compare digests where the toolchain matches."""
    if clang is None:
        return "", f"rebuild skipped: no clang >= {MIN_CLANG} found (tried CLANG, {', '.join(CLANGS)})"
    version = clang_version(clang)
    differs = []  # why a digest comparison would not be meaningful, per object
    with tempfile.TemporaryDirectory(prefix="ct-bpf-") as tmp:
        for src in sources():
            name = object_name(src)
            try:
                out = compile_one(clang, None, src, tmp)
            except subprocess.CalledProcessError:
                stale.append(f"{name}: does not compile with {clang} {version}")
                continue
            if major(version) != major(manifest["clang"]):
                differs.append(name)
            elif libbpf_headers(clang, src) != manifest["objects"][name]["libbpf_headers"]:
                differs.append(f"{name} (other libbpf headers)")
            elif objdigest.digest(out) != manifest["objects"][name]["digest"]:
                stale.append(f"{name}: a rebuild with {clang} {version} differs from the manifest")
    if not differs:
        return f", rebuild with {clang} {version}", ""
    return (f", compiled with {clang} {version}",
            f"rebuild comparison skipped for {', '.join(differs)}: built with clang {manifest['clang']}, "
            f"here {clang} {version} (each source still compiles)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if shipped objects do not match their sources")
    args = ap.parse_args()
    clang = find_clang()
    if args.check:
        return check(clang)
    if clang is None:
        sys.exit(f"clang >= {MIN_CLANG} not found: apt-get install clang (or set CLANG); only needed to rebuild")
    return build(clang)


if __name__ == "__main__":
    raise SystemExit(main())
