"""The agent's configuration: one TOML file, every key declared once here (with its default and
its documentation), overridden by command-line flags.

packaging/agent.toml is the commented example; tests/unit/test_agent_config.py checks that it
documents exactly the keys declared here. Unknown keys and wrong types are errors (a typo must
not silently leave a default in force).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from crypto_tracer.errors import ExitStatus, TracerError

DEFAULT_CONFIG_PATH = "/etc/crypto-tracer/agent.toml"
DEFAULT_OUTPUT_DIR = "/var/log/crypto-tracer"
EVENT_TYPES = ("process_exec", "process_exit", "file_open", "lib_load")


@dataclass(frozen=True)
class Key:
    default: object
    types: tuple
    doc: str
    live: bool = True  # applied by SIGHUP; False: needs a restart


def _num(*extra):
    return (int, float, *extra)


SCHEMA: dict[str, dict[str, Key]] = {
    "agent": {
        "output_dir": Key(DEFAULT_OUTPUT_DIR, (str,), "directory of every file the agent writes (created 0700)",
                          live=False),
        "duration": Key(0, _num(), "stop after this many seconds; 0 = run until stopped", live=False),
        "redact": Key(True, (bool,), "redact /home/<user> and /root in paths", live=False),
        "ring_buffer_size": Key(4 << 20, (int,), "kernel ring buffer in bytes (power of two, >= 4096)", live=False),
        "queue_size": Key(8192, (int,), "events each sink may have waiting before new ones are dropped", live=False),
    },
    "events": {
        "enabled": Key(True, (bool,), "write monitor's events as JSON Lines"),
        "event_types": Key(list(EVENT_TYPES), (list,), "which events to trace: " + ", ".join(EVENT_TYPES),
                           live=False),
        "file": Key("events.jsonl", (str,), "file name in output_dir"),
        "max_size_mb": Key(10, _num(), "rotate when the file would pass this size (MB, fractions allowed)"),
        "max_backups": Key(5, (int,), "rotated files kept (events.jsonl.1[.gz] newest); 0 = none kept"),
        "compress": Key(True, (bool,), "gzip rotated files"),
    },
    "handshake": {
        "enabled": Key(True, (bool,), "one tls_handshake event per TLS handshake on the host, from packets (as "
                       "`tls -m handshake`; needs CAP_NET_ADMIN, else one warning and none)", live=False),
    },
    "snapshot": {
        "enabled": Key(True, (bool,), "take a snapshot of the host's crypto inventory periodically"),
        "interval": Key(3600, _num(), "seconds between snapshots (the first one at start)"),
        "keep": Key(24, (int,), "snapshot files kept in output_dir/snapshots (per format); older ones are removed"),
        "formats": Key(["json"], (list,), "json (snapshot-<time>.json, as `snapshot`) and/or cyclonedx "
                       "(snapshot-<time>.cdx.json, a CycloneDX 1.6 CBOM, as `snapshot -f cyclonedx`)"),
    },
    "otlp": {
        "endpoint": Key("", (str,), "OTLP collector URL, e.g. http://127.0.0.1:4318; empty = no export"),
        "protocol": Key("http", (str,), "http (OTLP/HTTP protobuf) or grpc"),
        "headers": Key({}, (dict,), "extra request headers, e.g. { authorization = \"Bearer ...\" }"),
        "ca_file": Key("", (str,), "CA bundle to verify the collector (https/TLS gRPC)"),
        "cert_file": Key("", (str,), "client certificate for mutual TLS"),
        "key_file": Key("", (str,), "client key for mutual TLS"),
        "service_name": Key("crypto-tracer", (str,), "resource attribute service.name"),
    },
    "metrics": {
        "address": Key("", (str,), "Prometheus endpoint HOST:PORT (PORT alone = 127.0.0.1:PORT); empty = none",
                       live=False),
        "final_scrape_wait": Key(0, _num(), "on stop, serve the final figures until a scrape of them was "
                                 "delivered, for at most this many seconds (0 = exit at once; twice the scrape "
                                 "interval loses no count)"),
    },
}


def defaults() -> dict:
    return {sec: {k: copy.deepcopy(key.default) for k, key in keys.items()} for sec, keys in SCHEMA.items()}


def _bad(path: str, message: str) -> TracerError:
    return TracerError(f"{path}: {message}", ExitStatus.BAD_ARGS,
                       f"see the commented example {DEFAULT_CONFIG_PATH} (packaging/agent.toml)")


def load(path: str | None) -> dict:
    """The configuration: defaults, then the file (if any). Raises TracerError (exit 2) on any error."""
    cfg = defaults()
    if not path:
        return cfg
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise _bad(path, f"invalid TOML: {exc}") from None
    for section, values in data.items():
        if section not in SCHEMA:
            raise _bad(path, f"unknown section [{section}] (known: {', '.join(SCHEMA)})")
        if not isinstance(values, dict):
            raise _bad(path, f"'{section}' must be a section ([{section}])")
        for name, value in values.items():
            key = SCHEMA[section].get(name)
            if key is None:
                raise _bad(path, f"unknown key '{name}' in [{section}] (known: {', '.join(SCHEMA[section])})")
            if not isinstance(value, key.types) or (isinstance(value, bool) and bool not in key.types):
                raise _bad(path, f"[{section}] {name} = {value!r}: expected {key.types[0].__name__}")
            cfg[section][name] = value
    validate(cfg, path)
    return cfg


def validate(cfg: dict, where: str = "configuration") -> None:
    a, e, s, o = cfg["agent"], cfg["events"], cfg["snapshot"], cfg["otlp"]
    size = a["ring_buffer_size"]
    if size < 4096 or size & (size - 1):
        raise _bad(where, f"[agent] ring_buffer_size = {size}: must be a power of two of at least 4096")
    if a["queue_size"] <= 0:
        raise _bad(where, "[agent] queue_size must be greater than 0")
    if a["duration"] < 0:
        raise _bad(where, "[agent] duration must not be negative")
    unknown = [t for t in e["event_types"] if t not in EVENT_TYPES]
    if unknown or not e["event_types"]:
        raise _bad(where, f"[events] event_types: {unknown or 'empty'} (known: {', '.join(EVENT_TYPES)})")
    if e["max_size_mb"] <= 0:
        raise _bad(where, "[events] max_size_mb must be greater than 0")
    if e["max_backups"] < 0:
        raise _bad(where, "[events] max_backups must not be negative")
    if not e["file"] or "/" in e["file"]:
        raise _bad(where, f"[events] file = {e['file']!r}: a file name, without '/'")
    if not s["formats"] or any(f not in ("json", "cyclonedx") for f in s["formats"]):
        raise _bad(where, f"[snapshot] formats = {s['formats']!r}: json and/or cyclonedx")
    if s["interval"] <= 0 or s["keep"] < 1:
        raise _bad(where, "[snapshot] interval must be > 0 and keep >= 1")
    if o["protocol"] not in ("http", "grpc"):
        raise _bad(where, f"[otlp] protocol = {o['protocol']!r}: http or grpc")
    if cfg["metrics"]["address"]:
        parse_address(cfg["metrics"]["address"], where)


def parse_address(text: str, where: str = "--metrics-address") -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or PORT (then 127.0.0.1: no listener beyond loopback unless asked)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        value = int(port, 10)
    except ValueError:
        value = -1
    if not 0 < value < 65536:
        raise _bad(where, f"metrics address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, value


def apply_flags(cfg: dict, opts) -> dict:
    """Command-line flags override the file."""
    if getattr(opts, "output_dir", None):
        cfg["agent"]["output_dir"] = opts.output_dir
    if getattr(opts, "duration", None) is not None:
        cfg["agent"]["duration"] = opts.duration
    if getattr(opts, "otlp_endpoint", None):
        cfg["otlp"]["endpoint"] = opts.otlp_endpoint
    if getattr(opts, "metrics_address", None):
        cfg["metrics"]["address"] = opts.metrics_address
    if getattr(opts, "no_redact", False):
        cfg["agent"]["redact"] = False
    if getattr(opts, "mapsize", None):
        cfg["agent"]["ring_buffer_size"] = opts.mapsize
    validate(cfg, "command line")
    cfg["agent"]["output_dir"] = os.path.abspath(cfg["agent"]["output_dir"])
    return cfg


def restart_needed(old: dict, new: dict) -> list[str]:
    """Keys changed by a reload that only a restart applies."""
    return [f"[{sec}] {name}" for sec, keys in SCHEMA.items() for name, key in keys.items()
            if not key.live and old[sec][name] != new[sec][name]]
