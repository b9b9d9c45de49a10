"""host.discovery on real Go programs: a Go binary with crypto/tls is a TLS "library" of kind go with the
offsets bpf/go_tls.h's programs need (never a uretprobe: entries after the stack check, Read's RETs); a Go
program without crypto/tls is not; static_tls reports Go's TLS with its version."""

import pytest

from crypto_tracer.host import discovery, gobin
from tests import gobuild

MATRIX = gobuild.matrix()


def build(label, variant):
    try:
        return gobuild.build(gobuild.toolchain(MATRIX[label]), variant)
    except gobuild.GoBuildError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("label", list(MATRIX))
@pytest.mark.parametrize("variant", list(gobuild.VARIANTS))
def test_go_tls_found(label, variant):
    progs = build(label, variant)
    d = discovery.Discovery()
    lib = d.examine(progs.server, progs.server)
    assert lib is not None and lib.kind == discovery.GO
    assert lib.go_version == gobuild.toolchain(MATRIX[label]).version
    info = gobin.inspect(progs.server)
    read = info.functions[gobin.READ]
    rets, _ = gobin.ret_offsets(progs.server, read)
    assert lib.go_probes["go_read_ret"] == rets
    assert gobin.tls_probes(progs.server, info).offsets == lib.go_probes  # in-process = the child's (discovery)
    for prog, func in (("go_write", gobin.WRITE_RECORD), ("go_read_enter", gobin.READ),
                       ("go_keylog", gobin.WRITE_KEYLOG)):
        f = info.functions[func]
        (off,) = lib.go_probes[prog]
        assert f.offset < off < f.offset + 32  # just after `cmp ..., [r14+0x10]; jbe`
    assert d.examine(progs.server, progs.server) is None  # once per file
    assert d.examine(progs.plain, progs.plain) is None and not d.go_unhookable
    static = discovery.static_tls(progs.client)
    assert static == {"library": "go", "symbols": sorted(gobin.TLS_FUNCTIONS),
                      "version": gobuild.toolchain(MATRIX[label]).version}
    assert discovery.static_tls(progs.plain) is None
