"""The BPF side's formats (bpf/tls_keys.h): the layout written into `keys_layouts`, and the
CT_EV_TLS_KEYS record read back."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.material import KeyMaterial
from crypto_tracer.probes.common import HEADER as _HEADER

CT_EV_TLS_KEYS = 8
LIB_OPENSSL = 1
SLOTS = 16  # keys_layouts entries; slot 0 means "no keys"
SLOT_SHIFT = 16  # the slot's place in a uprobe cookie

_LAYOUT = struct.Struct("<I16i")
_KEYS = struct.Struct("<QIiII32s48s64s64s64s64s64s")
RECORD_SIZE = _HEADER.size + _KEYS.size  # 464


def layout_value(lay: Layout | None) -> bytes:
    """struct ct_keys_layout; None disables key reading for that slot."""
    if lay is None:
        return bytes(_LAYOUT.size)
    deref, off = lay.client_random
    return _LAYOUT.pack(1, deref, off, lay.tls_version, lay.session, lay.master_key, lay.cipher, lay.cipher_id,
                        lay.hs_a, lay.hs_b, lay.client_app, lay.server_app, lay.exporter, lay.version_deref,
                        int(lay.version_be), int(lay.cipher_in_session), int(lay.cipher_id_be))


@dataclass
class KeysRecord:
    ts_ns: int
    pid: int
    tid: int
    uid: int
    comm: str
    ssl: int
    lib_kind: int
    slot: int
    material: KeyMaterial


def decode(data: bytes, hs_direct: bool = False) -> KeysRecord:
    ts, _type, pid, tid, uid, comm = _HEADER.unpack_from(data, 0)
    (ssl, lib_kind, version, cipher_id, slot, cr, master, hs_a, hs_b, capp, sapp,
     exporter) = _KEYS.unpack_from(data, _HEADER.size)
    material = KeyMaterial(version=version, cipher_id=cipher_id, client_random=cr, master_key=master, hs_a=hs_a,
                           hs_b=hs_b, client_app=capp, server_app=sapp, exporter=exporter, hs_direct=hs_direct)
    return KeysRecord(ts, pid, tid, uid, comm.split(b"\0", 1)[0].decode(errors="replace"), ssl, lib_kind, slot,
                      material)
