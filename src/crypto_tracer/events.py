"""The event schema, in one place: event types, their fields and field order.

Every event is a dict with the common fields first, then its own fields, in the order
below. Unknown values are None (JSON null), never invented.
"""

COMMON_FIELDS = ("event_type", "timestamp", "pid", "ppid", "uid", "process", "exe")

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "process_exec": ("cmdline",),
    "process_exit": ("exit_code", "signal"),
    "file_open": ("file", "file_type", "flags", "result"),
    "lib_load": ("library", "library_name", "version"),
    "api_call": ("function_name", "library"),
    "tls_handshake": ("tid", "library", "role", "fd", "local_addr", "local_port", "remote_addr", "remote_port",
                      "result", "tls_version", "cipher"),
    "tls_data": ("tid", "library", "function", "direction", "fd", "local_addr", "local_port", "remote_addr",
                 "remote_port", "length", "offset", "truncated", "data_b64"),
}

EVENT_TYPES = tuple(EVENT_FIELDS)

# Fields that hold paths and are redacted unless --no-redact.
PATH_FIELDS = ("exe", "file", "library")


def make(event_type: str, common: dict, **own) -> dict:
    """Build an event with fields in schema order; missing ones are None."""
    ev = {"event_type": event_type}
    for name in COMMON_FIELDS[1:]:
        ev[name] = common.get(name)
    for name in EVENT_FIELDS[event_type]:
        ev[name] = own.get(name)
    return ev
