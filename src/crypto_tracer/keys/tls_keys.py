"""The Python side of bpf/tls_keys.h: the layout written into `keys_layouts`, and the
CT_EV_TLS_KEYS record read back."""

from __future__ import annotations

from dataclasses import dataclass

from crypto_tracer.bpf.cstruct import CEnum, CStruct
from crypto_tracer.keys.layout import Layout
from crypto_tracer.keys.material import KeyMaterial
from crypto_tracer.probes.common import CT_EV_TLS_KEYS, CT_HEADER  # noqa: F401 (CT_EV_TLS_KEYS: API)
from crypto_tracer.probes.common import HEADER as _HEADER

# enum tls_keys_const (checked against tls.bpf.o's BTF by tests/unit/test_bpf_layouts.py)
CT_TLS_SECRET_LEN = 64
CT_TLS_MASTER_KEY_LEN = 48
CT_TLS_KEYS_SLOTS = SLOTS = 16  # keys_layouts entries; slot 0 means "no keys"
CT_TLS_KEYS_SLOT_SHIFT = SLOT_SHIFT = 16  # the slot's place in a uprobe cookie
KEYS_CONST = CEnum.from_module("tls_keys_const", globals(), "CT_TLS_")

KEYS_LAYOUT = CStruct("ct_keys_layout", "enabled I cr_deref i cr_off i version_off i session_off i master_key_off i "
                      "cipher_off i cipher_id_off i hs_a_off i hs_b_off i client_app_off i server_app_off i "
                      "exporter_off i version_deref i version_be i cipher_in_session i cipher_id_be i")
_s, _m = f"{CT_TLS_SECRET_LEN}s", f"{CT_TLS_MASTER_KEY_LEN}s"
KEYS_EVENT = CStruct("ct_tls_keys_event", ("h", CT_HEADER),
                     f"ssl Q lib_kind I version i cipher_id I slot I client_random 32s master_key {_m} hs_a {_s} "
                     f"hs_b {_s} client_app {_s} server_app {_s} exporter {_s}")
# enum tls_keys_status (what tls_keys_read found) and enum tls_obj_event (CT_EV_TLS_OBJECT records)
CT_KEYS_DONE, CT_KEYS_INCOMPLETE, CT_KEYS_NOTHING = 0, 1, 2
KEYS_STATUS = CEnum("tls_keys_status", {"CT_KEYS_DONE": 0, "CT_KEYS_INCOMPLETE": 1, "CT_KEYS_NOTHING": 2})
CT_OBJ_NEW, CT_OBJ_FREE, CT_OBJ_FREE_INCOMPLETE = 1, 2, 3
OBJ_EVENTS = CEnum("tls_obj_event", {"CT_OBJ_NEW": 1, "CT_OBJ_FREE": 2, "CT_OBJ_FREE_INCOMPLETE": 3})
OBJ_REC = CStruct("ct_tls_obj_rec", ("h", CT_HEADER), "ssl Q slot I event I")
_OBJ = OBJ_REC.after("h")
_LAYOUT = KEYS_LAYOUT.struct
_KEYS = KEYS_EVENT.after("h")
RECORD_SIZE = KEYS_EVENT.size  # 464


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


def decode_object(data: bytes) -> tuple[int, int, int, int]:
    """CT_EV_TLS_OBJECT -> (pid, ssl, slot, event)."""
    pid = _HEADER.unpack_from(data, 0)[2]
    ssl, slot, event = _OBJ.unpack_from(data, _HEADER.size)
    return pid, ssl, slot, event
