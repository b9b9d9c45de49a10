"""The command line: every command and option, declared once, and the dispatcher.

Commands are implemented in ``crypto_tracer.commands.<module>`` as ``run(opts) -> int``
and imported lazily, so ``--help`` and ``snapshot`` never pay for the eBPF stack.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field

from crypto_tracer import __version__
from crypto_tracer.errors import ExitStatus, TracerError

PROG = "crypto-tracer"
STREAM_FORMATS = ("json-stream", "json-array", "json-pretty", "summary")
TLS_MODELS = ("text", "json", "streams", "keylog", "key", "pcap", "pcapng", "handshake")


# --- argument types: each rejects bad input with one clear sentence -------------------------

def _non_negative_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value '{text}': expected a whole number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value '{text}': must not be negative")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value '{text}': expected a positive integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value '{text}': must be greater than 0")
    return value


def _uid(text: str) -> int:
    """A uid may be 0 (root): unlike eCapture, uid 0 is selectable."""
    try:
        value = int(text, 10)
    except ValueError:
        import pwd

        try:
            return pwd.getpwnam(text).pw_uid
        except KeyError:
            raise argparse.ArgumentTypeError(f"invalid uid '{text}': not a number or a known user") from None
    if value < 0 or value > 0xFFFFFFFE:
        raise argparse.ArgumentTypeError(f"invalid uid '{text}'")
    return value


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (binary units)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    try:
        value = int(t, 10) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}': expected bytes, e.g. 1048576 or 1M") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size '{text}': must be greater than 0")
    return value


# --- the declarative option set --------------------------------------------------------------

@dataclass(frozen=True)
class Opt:
    flags: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


OPTIONS: dict[str, Opt] = {
    "duration": Opt(("-d", "--duration"), dict(type=_non_negative_int, metavar="SECONDS",
                    help="stop after SECONDS (0 = until Ctrl-C)")),
    "pid": Opt(("-p", "--pid"), dict(type=_positive_int, metavar="PID", help="only this process (filtered in the kernel)")),
    "name": Opt(("-n", "--name"), dict(metavar="NAME",
                help="only processes whose command name contains NAME, case-insensitive (filtered in the kernel)")),
    "uid": Opt(("-u", "--uid"), dict(type=_uid, metavar="UID", help="only processes of this user id or name (0 allowed)")),
    "library": Opt(("-l", "--library"), dict(metavar="LIB", action="append",
                   help="only library events whose path or name contains LIB, case-insensitive (repeatable)")),
    "file": Opt(("-F", "--file"), dict(metavar="GLOB", action="append",
                help="only file events whose path matches GLOB; '*' crosses '/', so '*.pem' matches /etc/ssl/x.pem (repeatable)")),
    "output": Opt(("-o", "--output"), dict(metavar="FILE", help="write events to FILE instead of stdout")),
    "stream_format": Opt(("-f", "--format"), dict(dest="format", choices=STREAM_FORMATS, default="json-stream",
                         help="output format (default: json-stream)")),
    "doc_format": Opt(("-f", "--format"), dict(dest="format", choices=STREAM_FORMATS, default="json-pretty",
                      help="output format (default: json-pretty)")),
    "snapshot_format": Opt(("-f", "--format"), dict(dest="format", choices=STREAM_FORMATS + ("cyclonedx",),
                           default="json-pretty",
                           help="output format (default: json-pretty); cyclonedx: a CycloneDX 1.6 CBOM (JSON)")),
    "observe": Opt(("--observe",), dict(type=_positive_int, metavar="SECONDS",
                   help="with -f cyclonedx: first observe TLS handshakes for SECONDS (as 'tls -m json'; needs its "
                        "privileges) and add the protocols and cipher suites in use")),
    "handshakes": Opt(("--handshakes",), dict(metavar="FILE",
                      help="with -f cyclonedx: add the TLS handshakes in FILE (tls_handshake events written by "
                           "'crypto-tracer tls -m json')")),
    "verbose": Opt(("-v", "--verbose"), dict(action="store_true", help="debug logs, libbpf's log and per-second figures")),
    "quiet": Opt(("-q", "--quiet"), dict(action="store_true", help="errors only; no statistics")),
    "no_redact": Opt(("--no-redact",), dict(action="store_true", help="do not redact /home/<user> and /root in paths")),
    "follow_children": Opt(("--follow-children",), dict(action="store_true", help="also profile descendants")),
    "mapsize": Opt(("--mapsize",), dict(type=_size, metavar="BYTES",
                   help="ring buffer size (power of two; default 4M for monitor); K/M suffixes allowed")),
    # tls
    "model": Opt(("-m", "--model"), dict(choices=TLS_MODELS, default="text",
                 help="text (default), json, streams (plaintext per connection and direction into files under -o DIR), keylog (alias key), pcapng (alias pcap), handshake (one event per TLS handshake from packets, any implementation; -f summary: one table)")),
    "keylogfile": Opt(("-k", "--keylogfile"), dict(metavar="FILE", help="write the NSS key log to FILE (mode 0600)")),
    "pcapfile": Opt(("-w", "--pcapfile"), dict(metavar="FILE", help="write a pcapng with decryption secrets to FILE")),
    "ifname": Opt(("-i", "--ifname"), dict(metavar="IFACE", action="append",
                  help="interface to capture for pcapng (repeatable; default lo)")),
    "libssl": Opt(("--libssl",), dict(metavar="PATH", action="append",
                  help="also hook this library or executable (repeatable)")),
    "decrypt_handshake": Opt(("--decrypt-handshake",), dict(action="store_true",
                             help="with -m handshake: also hook the TLS libraries' once-per-handshake key functions "
                                  "(as -m keylog) to read TLS 1.3's encrypted ALPN and certificate where a hooked "
                                  "library did the handshake")),
    "hex": Opt(("--hex",), dict(action="store_true", help="print payloads as a hex dump")),
    "tsize": Opt(("-t", "--tsize"), dict(type=_non_negative_int, default=0, metavar="N",
                 help="print at most N bytes of each payload (capture is unaffected; 0 = all)")),
    "max_payload": Opt(("--max-payload",), dict(type=_size, default=1 << 20, metavar="BYTES",
                       help="capture at most BYTES of each call, the rest is marked truncated (default 1M)")),
    # agent
    "config": Opt(("-c", "--config"), dict(metavar="FILE",
                  help="TOML configuration (default /etc/crypto-tracer/agent.toml when it exists)")),
    "output_dir": Opt(("--output-dir",), dict(metavar="DIR",
                      help="directory for events, snapshots (default /var/log/crypto-tracer)")),
    "otlp_endpoint": Opt(("--otlp-endpoint",), dict(metavar="URL",
                         help="export events as OpenTelemetry logs to this OTLP collector, e.g. http://127.0.0.1:4318")),
    "metrics_address": Opt(("--metrics-address",), dict(metavar="HOST:PORT",
                           help="serve Prometheus metrics here (PORT alone binds 127.0.0.1)")),
    "filter": Opt(("filter",), dict(nargs="*", metavar="FILTER",
                  help="connection filter: 'port 443', 'host 10.0.0.1 and not port 22' (see README)")),
}

# Which options each command takes, in help order.
STREAM_OPTS = ("duration", "pid", "name", "uid", "library", "file", "output", "stream_format",
               "verbose", "quiet", "no_redact", "mapsize")


# Privileges, checked before a command runs (engine/preflight.py): root, or these capabilities.
BPF = ("CAP_BPF", "CAP_PERFMON")  # load and attach eBPF programs, read kernel memory
PACKETS = BPF + ("CAP_NET_ADMIN",)  # and attach TC programs (packet capture)


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    summary: str
    options: tuple[str, ...]
    description: str = ""
    defaults: dict = field(default_factory=dict)
    privileges: tuple[str, ...] = ()  # what the command needs
    privileges_by_model: dict = field(default_factory=dict)  # tls: what each -m mode needs

    def needs(self, opts: argparse.Namespace) -> tuple[str, ...]:
        return self.privileges_by_model.get(getattr(opts, "model", None), self.privileges)


COMMANDS: tuple[Command, ...] = (
    Command("monitor", "monitor", "Monitor cryptographic operations live (every crypto event)", STREAM_OPTS,
            "Monitor cryptographic operations in real time: crypto library loads, key and certificate "
            "opens, process starts and exits.", {"event_types": None}, privileges=BPF),
    Command("libs", "monitor", "Stream crypto library loads (lib_load events)", STREAM_OPTS,
            "Stream every crypto library a process maps, linked at start-up or loaded with dlopen.",
            {"event_types": ("lib_load",)}, privileges=BPF),
    Command("files", "monitor", "Stream crypto file opens (file_open events)", STREAM_OPTS,
            "Stream every open of a certificate, key, keystore or trust-store file.",
            {"event_types": ("file_open",)}, privileges=BPF),
    Command("profile", "profile", "Profile one process's crypto use over a period",
            ("duration", "pid", "name", "output", "doc_format", "verbose", "quiet", "no_redact",
             "follow_children", "mapsize"),
            "Profile everything one process (or every process named NAME) does with cryptography: "
            "libraries, files, API calls, TLS sessions. --duration defaults to 30 s.", privileges=BPF),
    Command("snapshot", "snapshot", "Inventory of crypto use on this host from /proc (no eBPF)",
            ("output", "snapshot_format", "observe", "handshakes", "verbose", "quiet", "no_redact"),
            "Take an instant inventory of every process's crypto libraries, files, certificates and "
            "keys, from /proc. Unprivileged, it covers your own processes and says how many it could not read. "
            "-f cyclonedx writes it as a CycloneDX 1.6 CBOM, with the TLS protocols and cipher suites in use "
            "when handshakes are given (--handshakes FILE) or observed (--observe SECONDS)."),
    Command("tls", "tls", "Capture TLS plaintext, key logs and pcapng (OpenSSL, GnuTLS, NSS)",
            ("model", "duration", "pid", "name", "uid", "output", "stream_format", "keylogfile", "pcapfile",
             "ifname", "libssl", "hex", "tsize", "max_payload", "mapsize", "verbose", "quiet", "no_redact",
             "filter", "decrypt_handshake"),
            "Capture what processes send and receive inside TLS, without their keys or any change to them. "
            "-m text|json prints plaintext; -m streams -o DIR writes each connection's plaintext per direction "
            "to its own file; -m keylog writes an NSS key log; -m pcapng writes packets "
            "with their decryption secrets, which Wireshark decrypts with nothing else.",
            privileges=BPF, privileges_by_model={"pcapng": PACKETS, "pcap": PACKETS, "handshake": PACKETS}),
    Command("agent", "agent", "Run as a host sensor: rotated JSON Lines, snapshots, OTLP, Prometheus",
            ("config", "output_dir", "otlp_endpoint", "metrics_address", "duration", "mapsize", "verbose", "quiet",
             "no_redact"),
            "Run monitor's stream, the TLS handshake posture (one tls_handshake event per handshake on the host, "
            "from packets, as tls -m handshake) and a periodic snapshot until stopped, writing rotated JSON Lines "
            "and snapshot files (mode 0600), optionally exporting OpenTelemetry logs and serving Prometheus metrics. "
            "Configured by one TOML file, overridden by flags. SIGTERM/SIGINT stop it (exit 0); SIGHUP "
            "reopens its files and reloads the configuration.", privileges=BPF),
    Command("demo", "demo", "Run monitor on a built-in demo workload for a few seconds",
            ("duration", "output", "stream_format", "verbose", "quiet", "no_redact"),
            "Start monitor, run a small workload that loads libssl, opens a fresh key and certificate and "
            "exits, and show the events.", privileges=BPF),
)
COMMANDS_BY_NAME = {c.name: c for c in COMMANDS}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one clear line and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise TracerError(f"{self.prog}: {message}", ExitStatus.BAD_ARGS,
                          f"see '{self.prog} --help'")


def _usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [f"Usage: {PROG} <command> [options]", "", "Commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    lines += [f"  {'help':<{width}}  Show help for a command", f"  {'version':<{width}}  Show version", "",
              "Global options: -h/--help, -V/--version",
              "Exit codes: 0 ok, 1 error, 2 bad arguments, 3 missing privileges, 4 kernel feature missing, "
              "5 eBPF load/attach failure.", f"Run '{PROG} help <command>' for its options."]
    return "\n".join(lines)


def build_parser(command: Command) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} {command.name}", description=command.description or command.summary)
    for key in command.options:
        opt = OPTIONS[key]
        parser.add_argument(*opt.flags, **opt.kwargs)
    parser.set_defaults(command=command.name, **command.defaults)
    return parser


def version_text() -> str:
    return (f"{PROG} version {__version__}\n"
            f"Python {sys.version.split()[0]}; kernel support: Linux 5.8+ with BTF\n"
            f"License: GPL-3.0-or-later")


def parse(argv: list[str]) -> argparse.Namespace | int:
    """Parse argv into options; returns an exit status when there is nothing to run."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return ExitStatus.OK if args else ExitStatus.BAD_ARGS
    if args[0] in ("-V", "--version", "version"):
        print(version_text())
        return ExitStatus.OK
    if args[0] == "help":
        if len(args) == 1:
            print(_usage())
            return ExitStatus.OK
        command = COMMANDS_BY_NAME.get(args[1])
        if command is None:
            raise TracerError(f"Unknown command '{args[1]}'", ExitStatus.BAD_ARGS, f"run '{PROG} help'")
        build_parser(command).print_help()
        return ExitStatus.OK
    # Global options given before the command are moved after it.
    front = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    if front and rest and args.index(rest[0]) > 0 and rest[0] in COMMANDS_BY_NAME:
        i = args.index(rest[0])
        args = [args[i]] + args[:i] + args[i + 1:]
    command = COMMANDS_BY_NAME.get(args[0])
    if command is None:
        raise TracerError(f"Unknown command '{args[0]}'", ExitStatus.BAD_ARGS, f"run '{PROG} --help'")
    parser = build_parser(command)
    if command.name == "tls":
        opts, extra = parser.parse_known_args(args[1:])
        if any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        opts.filter = list(opts.filter or []) + extra
    else:
        opts = parser.parse_args(args[1:])
    _validate(opts, parser)
    return opts


def _validate(opts: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks that span several options."""
    if getattr(opts, "verbose", False) and getattr(opts, "quiet", False):
        parser.error("--verbose and --quiet cannot be used together")
    if opts.command == "profile":
        if opts.pid is None and opts.name is None:
            parser.error("profile needs a target: --pid PID or --name NAME")
        if opts.pid is not None and opts.name is not None:
            parser.error("give either --pid or --name, not both")
        if not opts.duration:
            opts.duration = 30
    mapsize = getattr(opts, "mapsize", None)
    if mapsize is not None and (mapsize & (mapsize - 1) or mapsize < 4096):
        parser.error(f"--mapsize {mapsize}: must be a power of two of at least 4096 bytes")
    output = getattr(opts, "output", None)
    if output is not None:
        _check_output_path(output, parser)


def _check_output_path(path: str, parser: argparse.ArgumentParser) -> None:
    if path == "":
        parser.error("--output: empty file name")
    if os.path.isdir(path):
        parser.error(f"--output {path}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        parser.error(f"--output {path}: directory {parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    try:
        opts = parse(argv)
        if isinstance(opts, int):
            return int(opts)
        from crypto_tracer import log

        log.setup(verbose=getattr(opts, "verbose", False), quiet=getattr(opts, "quiet", False))
        command = COMMANDS_BY_NAME[opts.command]
        module = importlib.import_module(f"crypto_tracer.commands.{command.module}")
        if hasattr(module, "check"):  # the command's own argument checks: before privileges
            module.check(opts)
        needs = command.needs(opts)
        if needs:
            from crypto_tracer.engine.preflight import preflight

            preflight(need_net_admin="CAP_NET_ADMIN" in needs)
        return int(module.run(opts))
    except TracerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return int(exc.status)
    except KeyboardInterrupt:
        return int(ExitStatus.OK)
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return int(ExitStatus.OK)
    except Exception as exc:  # last resort: one line, traceback only with --verbose
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitStatus.ERROR)
