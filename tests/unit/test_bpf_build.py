"""`python -m crypto_tracer.bpf.build --check` in copies of the repository at two paths.

The copies hold the committed BPF sources, objects and manifest (git archive HEAD, or the
tree itself outside git) with the working tree's build.py and objdigest.py, the code under
test. The check must pass at a short and a deep path (clang-16 numbers BTF types by heap
layout, so the object bytes depend on the path) and fail exactly for edited inputs.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from crypto_tracer.bpf import build
from tests.harness import REPO

BPF = os.path.join("src", "crypto_tracer", "bpf")
OK = (f"BPF objects match their sources ({len([f for f in os.listdir(os.path.join(REPO, BPF)) if f.endswith('.bpf.c')])}"
      " checked: sources, headers, objects")


def make_copy(dest: str) -> str:
    os.makedirs(dest)
    if os.path.isdir(os.path.join(REPO, ".git")):
        archive = subprocess.run(["git", "-C", REPO, "archive", "HEAD", BPF, "src/crypto_tracer/__init__.py"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    else:
        shutil.copytree(os.path.join(REPO, BPF), os.path.join(dest, BPF))
        shutil.copy(os.path.join(REPO, "src/crypto_tracer/__init__.py"), os.path.join(dest, "src/crypto_tracer"))
    for code in ("build.py", "objdigest.py"):
        shutil.copy(os.path.join(REPO, BPF, code), os.path.join(dest, BPF, code))
    return dest


def check(copy: str, path_env: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.join(copy, "src")}
    if path_env:
        env["PATH"] = path_env
        env.pop("CLANG", None)
    return subprocess.run([sys.executable, "-m", "crypto_tracer.bpf.build", "--check"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120)


def stale_lines(res: subprocess.CompletedProcess) -> list[str]:
    assert res.returncode == 1, res.stdout + res.stderr
    head, *lines = res.stderr.splitlines()
    assert head == "stale BPF objects (run python -m crypto_tracer.bpf.build):"
    return [line.strip() for line in lines]


def edit(copy: str, name: str, fn) -> None:
    path = os.path.join(copy, BPF, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(fn(data))


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("bpfcheck"))
    return make_copy(os.path.join(base, "s")), make_copy(os.path.join(base, "a/much/deeper/path/to/the/clone"))


def local_clang() -> tuple[str | None, str | None]:
    clang = build.find_clang()
    return clang, build.clang_version(clang) if clang else None


def test_check_passes_at_a_short_and_a_deep_path(copies):
    clang, version = local_clang()
    for copy in copies:
        res = check(copy)
        assert res.returncode == 0, res.stderr
        first, *rest = res.stdout.splitlines()
        assert first.startswith(OK)
        if clang is None:
            assert rest == [f"rebuild skipped: no clang >= 14 found (tried CLANG, {', '.join(build.CLANGS)})"]
        elif build.major(version) == 16:  # the manifest's: the rebuild's digests were compared
            assert first == OK + f", rebuild with {clang} {version})" and rest == []
        else:
            assert first == OK + f", compiled with {clang} {version})"
            assert rest[0].startswith("rebuild comparison skipped for api.bpf.o, monitor.bpf.o, tc_capture.bpf.o")


def test_header_byte_changed_fails_for_the_objects_that_include_it(tmp_path):
    copy = make_copy(str(tmp_path / "c"))
    flip_last = lambda d: d[:-1] + bytes([d[-1] ^ 1])  # noqa: E731  the final newline becomes \v
    edit(copy, "paths.h", flip_last)
    assert stale_lines(check(copy)) == ["monitor.bpf.o: paths.h changed since it was built",
                                        "tc_capture.bpf.o: paths.h changed since it was built",
                                        "tls.bpf.o: paths.h changed since it was built"]
    edit(copy, "common.h", flip_last)
    assert stale_lines(check(copy)) == [
        "api.bpf.o: common.h changed since it was built",
        "monitor.bpf.o: common.h, paths.h changed since it was built",
        "tc_capture.bpf.o: common.h, paths.h changed since it was built",
        "tls.bpf.o: common.h, paths.h changed since it was built",
        "tls_hello.bpf.o: common.h changed since it was built",
    ]


def test_source_comment_touched_fails(tmp_path):
    copy = make_copy(str(tmp_path / "c"))
    edit(copy, "tc_capture.bpf.c", lambda d: d + b"/* touched */\n")
    assert stale_lines(check(copy)) == ["tc_capture.bpf.o: tc_capture.bpf.c changed since it was built"]


def test_swapped_object_fails(tmp_path):
    copy = make_copy(str(tmp_path / "c"))
    shutil.copy(os.path.join(copy, BPF, "api.bpf.o"), os.path.join(copy, BPF, "tc_capture.bpf.o"))
    assert stale_lines(check(copy)) == ["tc_capture.bpf.o: object differs from the one the manifest recorded"]


def test_hand_made_manifest_is_caught_by_the_rebuild(tmp_path):
    """A changed program whose manifest entry was edited to match passes (a) and (b); only (c) sees it."""
    copy = make_copy(str(tmp_path / "c"))
    edit(copy, "api.bpf.c", lambda d: d.replace(b"return 0;", b"return 1;", 1))
    manifest_path = os.path.join(copy, BPF, "objects.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["objects"]["api.bpf.o"]["inputs"]["api.bpf.c"] = build.sha256(os.path.join(copy, BPF, "api.bpf.c"))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    clang, version = local_clang()
    res = check(copy)
    if clang and build.major(version) == 16:
        assert stale_lines(res) == [f"api.bpf.o: a rebuild with {clang} {version} differs from the manifest"]
    else:  # another clang (or none) cannot tell: the check says the comparison was skipped
        assert res.returncode == 0 and "skipped" in res.stdout


def test_without_clang_sources_and_objects_are_still_checked(tmp_path):
    copy = make_copy(str(tmp_path / "c"))
    no_clang = os.path.join(str(tmp_path), "bin")  # a PATH with nothing on it
    os.makedirs(no_clang)
    res = check(copy, path_env=no_clang)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        OK + ")", f"rebuild skipped: no clang >= 14 found (tried CLANG, {', '.join(build.CLANGS)})"]
    edit(copy, "tls_keys.h", lambda d: d + b"\n")
    assert stale_lines(check(copy, path_env=no_clang)) == ["tls.bpf.o: tls_keys.h changed since it was built"]


def test_other_clang_major_only_compiles(tmp_path):
    """A manifest from another clang major: no digest comparison, one line saying so, still exit 0."""
    copy = make_copy(str(tmp_path / "c"))
    manifest_path = os.path.join(copy, BPF, "objects.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["clang"] = "99.0.0"
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    clang, version = local_clang()
    res = check(copy)
    assert res.returncode == 0, res.stderr
    if clang is None:
        assert res.stdout.splitlines()[1].startswith("rebuild skipped: no clang")
    else:
        assert res.stdout.splitlines() == [
            OK + f", compiled with {clang} {version})",
            "rebuild comparison skipped for api.bpf.o, monitor.bpf.o, tc_capture.bpf.o, tls.bpf.o, tls_hello.bpf.o: "
            f"built with clang 99.0.0, here {clang} {version} (each source still compiles)"]
