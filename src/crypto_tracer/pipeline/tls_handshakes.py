"""`tls -m handshake`: one tls_handshake event per TLS handshake seen in packets (hello_facts.py),
attributed to the process owning the socket (probes/socket_owner.py: pid, comm, ppid, uid and exe
as at connect()/accept(), also for a process gone since) where that is known, and
for -f summary one table: which process talks to whom with what."""

from __future__ import annotations

from collections import Counter

from crypto_tracer.host import proc
from crypto_tracer.pipeline import hello_facts as hf
from crypto_tracer.pipeline.events import TLS_HANDSHAKE


def _holds_udp_socket(pid: int, local: tuple, remote: tuple) -> bool:
    """Whether pid holds a UDP socket connected from local to remote now. The owners map keeps a
    connected UDP socket's entry after it is closed, and a later unconnected socket on the same
    addresses and ports goes through no connect(): only the live socket proves its owner."""
    inodes = set(proc.socket_inodes(pid))
    for name in ("udp", "udp6") if inodes else ():
        for la, lport, ra, rport, _state, inode in proc.tcp_rows(proc.read_bytes(f"/proc/{pid}/net/{name}", 16 << 20)
                                                                  or b""):
            if inode in inodes and (lport, rport) == (local[1], remote[1]) and \
                    proc.address_text(proc.family_of(la), la) == local[0] and \
                    proc.address_text(proc.family_of(ra), ra) == remote[0]:
                return True
    return False


def _owner(owners, local: tuple, remote: tuple, quic: bool):
    owner = owners.owner(local, remote) if owners else None
    if owner is not None and quic and not _holds_udp_socket(owner.pid, local, remote):
        return None  # a closed socket's entry (or its process gone): unknown, never a guess
    return owner


def handshake_event(facts: hf.ConnFacts, owners, clock) -> dict:
    quic = facts.transport == "quic"
    owner, role = _owner(owners, facts.client, facts.server, quic), None
    if owner is not None:
        role, local, remote = "client", facts.client, facts.server
    else:
        owner = _owner(owners, facts.server, facts.client, quic)
        role = "server" if owner is not None else None
        local, remote = (facts.server, facts.client) if owner is not None else (facts.client, facts.server)
    pid, comm, ppid, uid, exe, mnt_ns = (owner.pid, owner.comm, owner.ppid, owner.uid, owner.exe, owner.mnt_ns) \
        if owner is not None else (None, None, None, None, None, None)
    f = facts.fields(with_cert=True)  # packets show the server's certificate
    return TLS_HANDSHAKE.build(
        timestamp=clock.iso(facts.ts_ns), pid=pid, ppid=ppid, uid=uid, process=comm, exe=exe, mnt_ns=mnt_ns, role=role,
        local_addr=local[0], local_port=local[1], remote_addr=remote[0], remote_port=remote[1],
        transport=facts.transport, tls_version=f["tls_version"], cipher=f["cipher"], cipher_code=facts.cipher,
        group=f["group"], sni=facts.sni,
        alpn=f["alpn"], resumed=f["resumed"], peer_cert_subject=f["peer_cert_subject"],
        peer_cert_issuer=f["peer_cert_issuer"], peer_key_type=f["peer_key_type"], peer_key_bits=f["peer_key_bits"],
        alpn_offered=facts.alpn_offered,
        offered_versions=[hf.VERSIONS.get(v, f"0x{v:04x}") for v in facts.offered_versions or []] or None,
        offered_ciphers=facts.offered_suites, offered_groups=[hf.group_name(g) for g in facts.offered_groups or []]
        or None, ja4=hf.ja4(facts), **hf.flags(facts))


SUMMARY_COLUMNS = ("process", "remote", "sni", "version", "cipher", "group", "count")


class HandshakeSummary:
    """-f summary: the handshakes counted by (process, remote, sni, version, cipher, group)."""

    def __init__(self, out):
        self.out = out
        self.rows: Counter[tuple] = Counter()

    def write(self, ev: dict) -> None:
        who = f"{ev['process']}[{ev['pid']}]" if ev["pid"] is not None else "?"
        remote = ev["remote_addr"] if ":" not in (ev["remote_addr"] or "") else f"[{ev['remote_addr']}]"
        if ev["role"] != "server":  # a server's peers: by address (their ports are ephemeral)
            remote = f"{remote}:{ev['remote_port']}"
        self.rows[(who, remote, ev["sni"] or "-", ev["tls_version"] or "-",
                   ev["cipher"] or "-", ev["group"] or "-")] += 1

    def flush(self) -> None:
        pass

    def render(self) -> str:
        rows = [SUMMARY_COLUMNS] + [(*k, str(n)) for k, n in sorted(self.rows.items(), key=lambda kv: (-kv[1], kv[0]))]
        widths = [max(len(r[i]) for r in rows) for i in range(len(SUMMARY_COLUMNS))]
        lines = [f"TLS handshakes: {sum(self.rows.values())}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.out.write_final(self.render().encode())
        self.out.close()
