"""The man page and the shell completions are generated from cli.py: every command and every option of
the parser is in each of them (so they cannot drift), man renders the page, bash completes from it."""

from __future__ import annotations

import os
import subprocess

import pytest

pytest.importorskip("argparse_manpage", reason="needs the docs extra (./setup test installs it)")
pytest.importorskip("shtab", reason="needs the docs extra (./setup test installs it)")

from crypto_tracer import cli, clidoc  # noqa: E402
from tests.harness import need_tool  # noqa: E402


def every_command_and_option(with_help: bool = True) -> dict[str, list[str]]:
    """command -> its option strings, straight from the parsers the CLI itself uses."""
    import argparse

    out = {}
    for command in cli.COMMANDS:
        parser = cli.build_parser(command)
        out[command.name] = [s for a in parser._actions for s in a.option_strings  # noqa: SLF001
                             if with_help or not isinstance(a, argparse._HelpAction)]  # noqa: SLF001
    return out


def test_the_definition_is_not_empty():
    options = every_command_and_option()
    assert {"monitor", "snapshot", "tls", "profile"} <= set(options)
    assert "--keylogfile" in options["tls"] and "--duration" in options["monitor"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    need_tool("man")
    path = tmp_path_factory.mktemp("man") / "crypto-tracer.8"
    assert clidoc.main(["--man", str(path)]) == 0
    # man -l formats a local file; LC_ALL=C keeps '-' a plain hyphen, col -b drops overstrikes
    # GROFF_NO_SGR: groff 1.23 (Debian 13) would emit colour escapes, which col -b does not remove
    env = dict(os.environ, LC_ALL="C", MANWIDTH="1000", MAN_KEEP_FORMATTING="0", GROFF_NO_SGR="1")
    r = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = subprocess.run(["col", "-b"], input=r.stdout, capture_output=True, text=True, check=True).stdout
    return path.read_text(), text


def test_man_page_is_section_8_and_renders(rendered):
    source, text = rendered
    assert source.startswith('.TH CRYPTO\\-TRACER "8"')
    first = text.strip().splitlines()[0]
    assert first.startswith("CRYPTO-TRACER(8)") and first.endswith("CRYPTO-TRACER(8)")
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "FILES", "SEE ALSO"):
        assert f"\n{heading}\n" in text, heading
    assert "eBPF load/attach" not in text and "an eBPF program failed to load or attach" in text


def test_man_page_has_every_command_and_option(rendered):
    _, text = rendered
    # argparse-manpage documents argparse's own -h/--help nowhere but in the usage lines
    for name, options in every_command_and_option(with_help=False).items():
        assert f"crypto-tracer {name}\n" in text  # listed under COMMANDS
        # the command's own section: its usage line and its OPTIONS
        section = text.split(f"\nCOMMAND 'crypto-tracer {name}'\n", 1)
        assert len(section) == 2, f"no section for {name}"
        body = section[1].split("\nCOMMAND '", 1)[0].split("\nEXIT STATUS\n", 1)[0]
        assert f"\nOPTIONS 'crypto-tracer {name}'\n" in body
        words = set(body.replace(",", " ").replace("[", " ").replace("]", " ").split())
        for opt in options:
            assert opt in words, f"{name} {opt} missing from the man page"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_has_every_command_and_option(shell):
    script = clidoc.completion(shell)
    for name, options in every_command_and_option().items():
        assert name in script
        for opt in options:
            assert opt in script, f"{shell}: {name} {opt} missing"


def complete_bash(script_path: str, words: list[str]) -> list[str]:
    """What bash completes for the last of words, with the generated script loaded."""
    quoted = " ".join(f"'{w}'" for w in words)
    prog = (f"source '{script_path}'; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
            f"COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; "
            f"_shtab_crypto_tracer crypto-tracer '{words[-1]}' '{words[-2]}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout.split()


def test_bash_completes_commands_options_and_choices(tmp_path):
    path = tmp_path / "crypto-tracer"
    assert clidoc.main(["--bash", str(path)]) == 0
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    commands = [c.name for c in cli.COMMANDS] + ["help", "version"]
    assert complete_bash(str(path), ["crypto-tracer", ""]) == commands
    assert complete_bash(str(path), ["crypto-tracer", "tls", "--k"]) == ["--keylogfile"]
    assert complete_bash(str(path), ["crypto-tracer", "tls", "-m", ""]) == list(cli.TLS_MODELS)
    assert set(complete_bash(str(path), ["crypto-tracer", "monitor", "--"])) == {
        o for o in every_command_and_option()["monitor"] if o.startswith("--")}


def test_zsh_script_parses(tmp_path):
    need_tool("zsh")
    path = tmp_path / "_crypto-tracer"
    assert clidoc.main(["--zsh", str(path)]) == 0
    assert path.read_text().startswith("#compdef crypto-tracer")
    r = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_prefix_installs_to_the_standard_places(tmp_path):
    assert clidoc.main(["--prefix", str(tmp_path)]) == 0
    for rel in ("share/man/man8/crypto-tracer.8", "share/bash-completion/completions/crypto-tracer",
                "share/zsh/site-functions/_crypto-tracer"):
        p = tmp_path / rel
        assert p.stat().st_size > 0 and (p.stat().st_mode & 0o777) == 0o644, rel
