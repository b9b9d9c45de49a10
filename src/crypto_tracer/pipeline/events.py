"""The event schema, in one place: event types, their fields and field order.

Every event is a dict with the common fields first, then its own fields, in the order
below. Unknown values are None (JSON null), never invented.
"""

COMMON_FIELDS = ("event_type", "timestamp", "pid", "ppid", "uid", "process", "exe")

# Every path field (exe, file, library, the paths in cmdline) is in the process's own view:
# what the process itself would open, also in a chroot or a container. The monitor's events
# say beside them which view that is: `root`, the process's root directory as the top of its
# mount tree sees it ("/srv/jail" for a chrooted process; "/" for a host process and for a
# container, whose mount tree is its own), and `mnt_ns`, the inode of its mount namespace
# (as in /proc/PID/ns/mnt; differs from the host's for a container or an `unshare --mount`).
PROCESS_VIEW_FIELDS = ("root", "mnt_ns")

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "process_exec": (*PROCESS_VIEW_FIELDS, "cmdline"),
    "process_exit": (*PROCESS_VIEW_FIELDS, "exit_code", "signal"),
    "file_open": (*PROCESS_VIEW_FIELDS, "file", "file_type", "flags", "result"),
    "lib_load": (*PROCESS_VIEW_FIELDS, "library", "library_name", "version"),
    "api_call": ("function_name", "library"),
    "tls_handshake": ("tid", "library", "role", "fd", "local_addr", "local_port", "remote_addr", "remote_port",
                      "result", "tls_version", "cipher"),
    "tls_data": ("tid", "library", "function", "direction", "fd", "local_addr", "local_port", "remote_addr",
                 "remote_port", "length", "offset", "truncated", "data_b64"),
}

EVENT_TYPES = tuple(EVENT_FIELDS)

# Fields that hold paths and are redacted unless --no-redact.
PATH_FIELDS = ("exe", "root", "file", "library")


def make(event_type: str, common: dict, **own) -> dict:
    """Build an event with fields in schema order; missing ones are None."""
    ev = {"event_type": event_type}
    for name in COMMON_FIELDS[1:]:
        ev[name] = common.get(name)
    for name in EVENT_FIELDS[event_type]:
        ev[name] = own.get(name)
    return ev
