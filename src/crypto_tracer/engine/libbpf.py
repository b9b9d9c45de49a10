"""ctypes declarations for the system libbpf.so.1 (Debian's 1.1.2 is the floor).

Only symbols present in libbpf 1.1 are required; newer ones are looked up with
``optional()``. Set CRYPTO_TRACER_LIBBPF to use another libbpf.so.1 (e.g. backports 1.4).
"""

from __future__ import annotations

import ctypes
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_int, c_size_t, c_uint, c_uint32,
                    c_uint64, c_ulong, c_void_p)

from crypto_tracer.errors import ExitStatus, TracerError

_LIB_NAMES = ("libbpf.so.1", "/usr/lib/x86_64-linux-gnu/libbpf.so.1", "/usr/lib64/libbpf.so.1",
              "/usr/lib/libbpf.so.1")


def _load() -> ctypes.CDLL:
    names = [os.environ["CRYPTO_TRACER_LIBBPF"]] if os.environ.get("CRYPTO_TRACER_LIBBPF") else _LIB_NAMES
    for name in names:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise TracerError("libbpf.so.1 not found", ExitStatus.KERNEL_FEATURE,
                      "install it: apt-get install libbpf1 (Debian/Ubuntu) or dnf install libbpf")


lib = _load()


class bpf_uprobe_opts(Structure):
    _fields_ = [("sz", c_size_t), ("ref_ctr_offset", c_size_t), ("bpf_cookie", c_uint64),
                ("retprobe", c_bool), ("func_name", c_char_p)]


class bpf_tc_hook(Structure):
    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int), ("parent", c_uint32)]


class bpf_tc_opts(Structure):
    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", c_uint32), ("prog_id", c_uint32),
                ("handle", c_uint32), ("priority", c_uint32)]


RINGBUF_CB = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
PRINT_CB = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_LINK_CREATE = 28  # bpf(2) command
BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type
BPF_F_UPROBE_MULTI_RETURN = 1


def _decl(name: str, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


bpf_object__open_file = _decl("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
bpf_object__load = _decl("bpf_object__load", c_int, c_void_p)
bpf_object__close = _decl("bpf_object__close", None, c_void_p)
bpf_object__find_program_by_name = _decl("bpf_object__find_program_by_name", c_void_p, c_void_p, c_char_p)
bpf_object__find_map_by_name = _decl("bpf_object__find_map_by_name", c_void_p, c_void_p, c_char_p)
bpf_object__next_program = _decl("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
bpf_program__name = _decl("bpf_program__name", c_char_p, c_void_p)
bpf_program__section_name = _decl("bpf_program__section_name", c_char_p, c_void_p)
bpf_program__set_autoload = _decl("bpf_program__set_autoload", c_int, c_void_p, c_bool)
bpf_program__autoload = _decl("bpf_program__autoload", c_bool, c_void_p)
bpf_program__fd = _decl("bpf_program__fd", c_int, c_void_p)
bpf_program__set_expected_attach_type = _decl("bpf_program__set_expected_attach_type", c_int, c_void_p, c_int)
bpf_program__attach = _decl("bpf_program__attach", c_void_p, c_void_p)
bpf_program__attach_tracepoint = _decl("bpf_program__attach_tracepoint", c_void_p, c_void_p, c_char_p, c_char_p)
bpf_program__attach_uprobe_opts = _decl("bpf_program__attach_uprobe_opts", c_void_p, c_void_p, c_int, c_char_p,
                                        c_size_t, POINTER(bpf_uprobe_opts))
bpf_link__destroy = _decl("bpf_link__destroy", c_int, c_void_p)
bpf_map__fd = _decl("bpf_map__fd", c_int, c_void_p)
bpf_map__set_max_entries = _decl("bpf_map__set_max_entries", c_int, c_void_p, c_uint32)
bpf_map__reuse_fd = _decl("bpf_map__reuse_fd", c_int, c_void_p, c_int)
bpf_map__max_entries = _decl("bpf_map__max_entries", c_uint32, c_void_p)
bpf_map__key_size = _decl("bpf_map__key_size", c_uint32, c_void_p)
bpf_map__value_size = _decl("bpf_map__value_size", c_uint32, c_void_p)
bpf_map_lookup_elem = _decl("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
bpf_map_update_elem = _decl("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
bpf_map_delete_elem = _decl("bpf_map_delete_elem", c_int, c_int, c_void_p)
bpf_map_get_next_key = _decl("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
ring_buffer__new = _decl("ring_buffer__new", c_void_p, c_int, RINGBUF_CB, c_void_p, c_void_p)
ring_buffer__add = _decl("ring_buffer__add", c_int, c_void_p, c_int, RINGBUF_CB, c_void_p)
ring_buffer__poll = _decl("ring_buffer__poll", c_int, c_void_p, c_int)
ring_buffer__consume = _decl("ring_buffer__consume", c_int, c_void_p)
ring_buffer__epoll_fd = _decl("ring_buffer__epoll_fd", c_int, c_void_p)
ring_buffer__free = _decl("ring_buffer__free", None, c_void_p)
libbpf_set_print = _decl("libbpf_set_print", c_void_p, PRINT_CB)
libbpf_num_possible_cpus = _decl("libbpf_num_possible_cpus", c_int)
bpf_tc_hook_create = _decl("bpf_tc_hook_create", c_int, POINTER(bpf_tc_hook))
bpf_tc_hook_destroy = _decl("bpf_tc_hook_destroy", c_int, POINTER(bpf_tc_hook))
bpf_tc_attach = _decl("bpf_tc_attach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
bpf_tc_detach = _decl("bpf_tc_detach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))


libbpf_probe_bpf_map_type = _decl("libbpf_probe_bpf_map_type", c_int, c_int, c_void_p)
BPF_MAP_TYPE_RINGBUF = 27


def optional(name: str):
    """A libbpf symbol newer than 1.1, or None."""
    return getattr(lib, name, None)


_libc = ctypes.CDLL(None, use_errno=True)
vsnprintf = _libc.vsnprintf
vsnprintf.restype = c_int
vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
syscall = _libc.syscall
syscall.restype = ctypes.c_long
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
malloc_trim = getattr(_libc, "malloc_trim", None)
if malloc_trim is not None:
    malloc_trim.restype = c_int
    malloc_trim.argtypes = [c_size_t]

__all__ = [n for n in dir() if not n.startswith("_")] + ["c_uint", "c_ulong"]
