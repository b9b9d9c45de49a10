"""The man page (section 8) and the bash/zsh completions, generated from the one CLI definition in cli.py.

    python -m crypto_tracer.clidoc --prefix /usr/local     # what ./setup does
    python -m crypto_tracer.clidoc --man FILE --bash FILE --zsh FILE

Nothing here is written by hand per option: ``full_parser()`` turns cli.COMMANDS (each command's own
parser, ``cli.build_parser``) into one argparse parser with a subcommand each, and argparse-manpage and
shtab (the ``docs`` extra) render that. A new command or option in cli.py appears in all three the next
time this runs; tests/unit/test_clidoc.py checks that every one does.
"""

from __future__ import annotations

import argparse
import os
import sys

from crypto_tracer import __version__, cli

MAN_SECTION = 8
# Where ./setup installs them under its prefix (/usr/local): the standard search paths of man-db,
# bash-completion (XDG_DATA_DIRS, /usr/local/share first) and Debian's zsh (fpath has site-functions).
MAN_PATH = "share/man/man8/crypto-tracer.8"
BASH_PATH = "share/bash-completion/completions/crypto-tracer"
ZSH_PATH = "share/zsh/site-functions/_crypto-tracer"

EXIT_STATUS = """\
.TP
.B 0
success, also a run ended by SIGINT, SIGTERM or \\-\\-duration
.TP
.B 1
a general error
.TP
.B 2
bad arguments
.TP
.B 3
missing privileges (root, or CAP_BPF and CAP_PERFMON; CAP_NET_ADMIN for pcapng and handshake capture)
.TP
.B 4
the kernel lacks a required feature (Linux 5.8 or later with BTF)
.TP
.B 5
an eBPF program failed to load or attach"""

FILES = """\
.TP
.I /etc/crypto-tracer/agent.toml
the agent's configuration (crypto\\-tracer agent \\-\\-config)
.TP
.I /var/log/crypto-tracer
the agent's JSON Lines files and snapshots (mode 0600)
.TP
.I /etc/systemd/system/crypto-tracer-agent.service
the agent's systemd unit (packaging/crypto-tracer-agent.service in the source)"""

SEE_ALSO = ".BR bpftool (8),\n.BR systemd-analyze (1),\n.BR wireshark (1)"


def _file_completion(parser: argparse.ArgumentParser) -> None:
    """Options that take a path complete file names (directories for DIR): shtab reads .complete."""
    import shtab

    for action in parser._actions:  # noqa: SLF001 (argparse has no public list of actions)
        metavar = action.metavar if isinstance(action.metavar, str) else ""
        if metavar in ("FILE", "PATH"):
            action.complete = shtab.FILE
        elif metavar == "DIR":
            action.complete = shtab.DIRECTORY


def full_parser(completion: bool = False) -> argparse.ArgumentParser:
    """Every command of cli.COMMANDS, plus help and version, as subcommands of one parser."""
    parser = argparse.ArgumentParser(
        prog=cli.PROG, description="Shows, live and at low cost, how a Linux host uses cryptography, with eBPF: "
        "crypto libraries, certificate and key files, crypto API calls, TLS handshakes, TLS plaintext, key logs "
        "and pcapng files.")
    parser.add_argument("-V", "--version", action="version", version=f"{cli.PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in cli.COMMANDS:
        own = cli.build_parser(command)
        p = sub.add_parser(command.name, parents=[own], add_help=False, help=command.summary,
                           description=own.description)
        if completion:
            _file_completion(p)
    p = sub.add_parser("help", help="Show help for a command", description="Show help for a command.")
    p.add_argument("topic", nargs="?", metavar="COMMAND", choices=[c.name for c in cli.COMMANDS],
                   help="the command to explain")
    sub.add_parser("version", help="Show version", description="Show the version.")
    return parser


def man_page() -> str:
    from argparse_manpage.manpage import Manpage

    page = Manpage(full_parser())
    page.section = MAN_SECTION
    page.source = f"{cli.PROG} {__version__}"
    page.manual = "System Administration"
    page.description = "see how a Linux host uses cryptography, with eBPF"
    page.add_section("exit status", ">", EXIT_STATUS)
    page.add_section("files", ">", FILES)
    page.add_section("see also", ">", SEE_ALSO)
    return str(page)


def completion(shell: str) -> str:
    import shtab

    return shtab.complete(full_parser(completion=True), shell=shell)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crypto_tracer.clidoc",
                                 description="Generate crypto-tracer's man page and shell completions from cli.py.")
    ap.add_argument("--prefix", help=f"install all three under PREFIX ({MAN_PATH}, {BASH_PATH}, {ZSH_PATH})")
    ap.add_argument("--man", metavar="FILE")
    ap.add_argument("--bash", metavar="FILE")
    ap.add_argument("--zsh", metavar="FILE")
    args = ap.parse_args(argv)
    if args.prefix:
        args.man = args.man or os.path.join(args.prefix, MAN_PATH)
        args.bash = args.bash or os.path.join(args.prefix, BASH_PATH)
        args.zsh = args.zsh or os.path.join(args.prefix, ZSH_PATH)
    if not (args.man or args.bash or args.zsh):
        ap.error("nothing to do: give --prefix or --man/--bash/--zsh")
    try:
        outputs = [(args.man, man_page), (args.bash, lambda: completion("bash")),
                   (args.zsh, lambda: completion("zsh"))]
        for path, make in outputs:
            if path:
                _write(path, make())
    except ImportError as exc:
        print(f"clidoc: error: {exc.name} is missing: install the docs extra (pip install 'crypto-tracer[docs]')",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
