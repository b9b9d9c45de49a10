"""The event schema, in one place: every event type, its fields and their order.

Every event is a dict with the common fields first, then its own fields, in the order
declared below (that is the JSON output order). Unknown values are None (JSON null), never
invented. Events are built only through their type: ``FILE_OPEN.build(pid=..., file=...)``
takes every field by name, refuses names the type does not have, and leaves the rest None.
"""

from __future__ import annotations

COMMON_FIELDS = ("event_type", "timestamp", "pid", "ppid", "uid", "process", "exe")

# Every path field (exe, file, library, the paths in cmdline) is in the process's own view:
# what the process itself would open, also in a chroot or a container. The monitor's events
# say beside them which view that is: `root`, the process's root directory as the top of its
# mount tree sees it ("/srv/jail" for a chrooted process; "/" for a host process and for a
# container, whose mount tree is its own), and `mnt_ns`, the inode of its mount namespace
# (as in /proc/PID/ns/mnt; differs from the host's for a container or an `unshare --mount`).
PROCESS_VIEW_FIELDS = ("root", "mnt_ns")

# Fields that hold a path, and fields of free text that may contain paths: both are redacted
# unless --no-redact (pipeline/redact.py).
PATH_FIELDS = ("exe", "root", "file", "library")
TEXT_FIELDS = ("cmdline",)


class EventType:
    """One event type: its name, all its fields in output order, and a builder by name."""

    __slots__ = ("build", "fields", "name", "own")

    def __init__(self, name: str, own: tuple[str, ...]):
        self.name, self.own = name, own
        self.fields = COMMON_FIELDS + own
        self.build = _builder(name, self.fields[1:])

    def __repr__(self) -> str:
        return f"EventType({self.name!r})"


def _builder(name: str, fields: tuple[str, ...]):
    # Generated once per type (as dataclasses do): keyword-only parameters defaulting to None
    # and one dict display in schema order, as fast as the hand-written literal it replaces.
    params = ", ".join(f"{f}=None" for f in fields)
    body = ", ".join(f"{f!r}: {f}" for f in fields)
    ns: dict = {}
    exec(f"def build(*, {params}):\n    return {{'event_type': {name!r}, {body}}}\n", ns)  # noqa: S102 (our names)
    build = ns["build"]
    build.__qualname__ = build.__name__ = f"build_{name}"
    build.__doc__ = f"A {name} event; fields by name, in schema order, missing ones None."
    return build


PROCESS_EXEC = EventType("process_exec", (*PROCESS_VIEW_FIELDS, "cmdline"))
PROCESS_EXIT = EventType("process_exit", (*PROCESS_VIEW_FIELDS, "exit_code", "signal"))
FILE_OPEN = EventType("file_open", (*PROCESS_VIEW_FIELDS, "file", "file_type", "flags", "result"))
LIB_LOAD = EventType("lib_load", (*PROCESS_VIEW_FIELDS, "library", "library_name", "version"))
API_CALL = EventType("api_call", ("function_name", "library"))
# tls_version .. peer_key_bits: from the hooked library where it says, else from the handshake
# messages (pipeline/hello_facts.py); the peer_* fields describe the peer's certificate (the server's
# on the client's event, the client's on the server's; TLS 1.3's alpn and certificates are encrypted:
# decrypted with the session's handshake secrets where known, pipeline/tls13_flight.py; QUIC: from its
# Handshake packets, pipeline/quic_initial.py; NSS's, whose secrets cannot be read, from its own
# sslSocket, tls.bpf.c nss_peer_facts; else null).
# `transport`: "tcp" or "quic" when the handshake messages were seen in packets (QUIC: in its Initial
# packets, pipeline/quic_initial.py), else null.
# `tls -m handshake` only (null elsewhere): the owner's mount namespace (which container, as
# monitor's `mnt_ns`), the ClientHello's offer (IANA code points; alpn_offered: names), its JA4
# fingerprint, and flags (pipeline/hello_facts.flags: null when not known).
HANDSHAKE_MODE_FIELDS = ("mnt_ns", "cipher_code", "alpn_offered", "offered_versions", "offered_ciphers",
                         "offered_groups",
                         "ja4", "legacy_version", "no_forward_secrecy", "weak_cipher",
                         "not_quantum_safe_key_exchange")
TLS_HANDSHAKE = EventType("tls_handshake", ("tid", "library", "role", "fd", "local_addr", "local_port", "remote_addr",
                                            "remote_port", "result", "transport", "tls_version", "cipher", "group", "sni",
                                            "alpn", "resumed", "peer_cert_subject", "peer_cert_issuer", "peer_key_type",
                                            "peer_key_bits", *HANDSHAKE_MODE_FIELDS))
TLS_DATA = EventType("tls_data", ("tid", "library", "function", "direction", "fd", "local_addr", "local_port",
                                  "remote_addr", "remote_port", "stream_id", "length", "offset", "truncated", "data_b64"))

TYPES: dict[str, EventType] = {t.name: t for t in (PROCESS_EXEC, PROCESS_EXIT, FILE_OPEN, LIB_LOAD, API_CALL,
                                                   TLS_HANDSHAKE, TLS_DATA)}
EVENT_TYPES = tuple(TYPES)
