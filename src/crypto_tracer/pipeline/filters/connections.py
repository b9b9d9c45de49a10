"""The connection filter: the trailing FILTER of `tls`, one grammar for every mode.

'port 443', 'portrange 400-500', 'host 10.0.0.1', 'net 10.0.0.0/8', optionally with
'src'/'dst', protocol words 'tcp', 'udp', 'ip', 'ip6', joined with 'and'/'or'/'not' and
parentheses ('&&', '||', '!'); juxtaposition means 'and', as in tcpdump.

A connection is (local addr, local port, remote addr, remote port). 'host'/'port' match
either end; 'src' means the local end and 'dst' the remote end, as seen by the traced
process. 'tcp', 'ip' and 'ip6' match every TLS connection (all are TCP). A connection whose
addresses are unknown never matches a filter that names an address or port.

Each mode applies the same parsed expression:
  text/json   compile_connection_filter: a predicate over each event's connection
  keylog      the same predicate, over the connection of each session's handshake (SessionFilter)
  pcapng      compile_packet_filter: the kernel packet filter of tc_capture.bpf.c, which holds
              a protocol, a set of ports and a set of hosts (each matching either end), ANDed;
              what it cannot hold is refused (exit 2), never approximated
'udp' only means something for packets and is refused for connections.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from crypto_tracer.errors import ExitStatus, TracerError

Conn = tuple  # (local_addr, local_port, remote_addr, remote_port)
Predicate = Callable[[Conn], bool]
UNKNOWN_CONN = (None, None, None, None)

_ALIASES = {"&&": "and", "||": "or", "!": "not"}
MAX_PORTS = MAX_HOSTS = 8  # tc_capture.bpf.c: CAP_PORTS, CAP_HOSTS


class FilterError(TracerError):
    def __init__(self, message: str, hint: str | None = "examples: 'port 443', 'host 127.0.0.1 and port 8443', "
                                                            "'not port 22'"):
        super().__init__(f"capture filter: {message}", ExitStatus.BAD_ARGS, hint)


# --- the grammar -----------------------------------------------------------------------------
#
# Expressions are tuples: ("proto", name), ("port", side, lo, hi, word), ("host", side, addr),
# ("net", side, network), ("not", e), ("and", [e...]), ("or", [e...]); side is None, "src" or "dst".

def _tokens(words: list[str]) -> list[str]:
    text = " ".join(words).replace("(", " ( ").replace(")", " ) ")
    for sym in ("&&", "||"):
        text = text.replace(sym, f" {sym} ")
    out = []
    for tok in text.split():
        if tok.startswith("!") and tok != "!":
            out += ["not", tok[1:]]
        else:
            out.append(_ALIASES.get(tok, tok).lower())
    return out


class _Parser:
    def __init__(self, tokens: list[str]):
        self.toks, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise FilterError("unexpected end of the expression")
        self.i += 1
        return tok

    def parse(self) -> tuple:
        expr = self.or_expr()
        if self.peek() is not None:
            raise FilterError(f"unexpected '{self.peek()}'")
        return expr

    def or_expr(self) -> tuple:
        parts = [self.and_expr()]
        while self.peek() == "or":
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def and_expr(self) -> tuple:
        parts = [self.unary()]
        while self.peek() is not None and self.peek() not in ("or", ")"):
            if self.peek() == "and":
                self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def unary(self) -> tuple:
        tok = self.peek()
        if tok == "not":
            self.take()
            return ("not", self.unary())
        if tok == "(":
            self.take()
            inner = self.or_expr()
            if self.take() != ")":
                raise FilterError("missing ')'")
            return inner
        return self.primitive()

    def primitive(self) -> tuple:
        tok = self.take()
        if tok in ("tcp", "udp", "ip", "ip6"):
            return ("proto", tok)
        side = None
        if tok in ("src", "dst"):
            side, tok = tok, self.take()
        if tok == "port":
            port = _port(self.take())
            return ("port", side, port, port, tok)
        if tok == "portrange":
            lo, _, hi = self.take().partition("-")
            return ("port", side, _port(lo), _port(hi), tok)
        if tok == "host":
            value = self.take()
            try:
                return ("host", side, ipaddress.ip_address(value))
            except ValueError:
                raise FilterError(f"'{value}' is not an IP address") from None
        if tok == "net":
            value = self.take()
            try:
                return ("net", side, ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise FilterError(f"'{value}' is not a network (e.g. 10.0.0.0/8)") from None
        raise FilterError(f"unknown word '{tok}'")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise FilterError(f"'{text}' is not a port number") from None
    if not 0 <= port <= 65535:
        raise FilterError(f"port {port} is out of range")
    return port


def parse(words: list[str] | None) -> tuple | None:
    """The expression, or None when there is no filter. Syntax errors are argument errors."""
    tokens = _tokens(list(words or []))
    return _Parser(tokens).parse() if tokens else None


# --- connections: text/json events, key log sessions -----------------------------------------

def compile_connection_filter(words: list[str] | None, with_packets: bool = False) -> Predicate | None:
    """A predicate over (laddr, lport, raddr, rport), or None when there is no filter.
    'udp' is refused unless the same filter also selects packets (with_packets: -m pcapng),
    where it matches no TLS connection."""
    expr = parse(words)
    return None if expr is None else _predicate(expr, with_packets)


def _predicate(e: tuple, with_packets: bool) -> Predicate:
    kind = e[0]
    if kind == "and":
        parts = [_predicate(x, with_packets) for x in e[1]]
        return lambda c: all(p(c) for p in parts)
    if kind == "or":
        parts = [_predicate(x, with_packets) for x in e[1]]
        return lambda c: any(p(c) for p in parts)
    if kind == "not":
        inner = _predicate(e[1], with_packets)
        return lambda c: not inner(c)
    if kind == "proto":
        if e[1] == "udp":
            if not with_packets:
                raise FilterError("'udp' only applies to -m pcapng (TLS connections are TCP)", None)
            return lambda c: False
        return lambda c: True
    side = e[1]
    if kind == "port":
        lo, hi = e[2], e[3]
        return _on_side(side, lambda addr, p: p is not None and lo <= p <= hi)
    if kind == "host":
        want = e[2]
        return _on_side(side, lambda addr, p: addr is not None and _same(addr, want))
    net = e[2]
    return _on_side(side, lambda addr, p: addr is not None and _in(addr, net))


def _same(addr: str, want) -> bool:
    try:
        return ipaddress.ip_address(addr) == want
    except ValueError:
        return False


def _in(addr: str, net) -> bool:
    try:
        return ipaddress.ip_address(addr) in net
    except ValueError:
        return False


def _on_side(side: str | None, test) -> Predicate:
    if side == "src":
        return lambda c: test(c[0], c[1])
    if side == "dst":
        return lambda c: test(c[2], c[3])
    return lambda c: test(c[0], c[1]) or test(c[2], c[3])


class SessionFilter:
    """Key log lines only for sessions whose connection matches.

    A key record (bpf/tls_keys.h) carries the pid and the SSL object but no addresses; the
    handshake record of the same session, sent by the same return right after it, carries the
    connection. Keys wait for it up to hold_s, then are decided with the connection unknown
    (which matches no filter naming an address or port): sessions whose handshake is not seen
    (started before the tool, or an implicit handshake as in node) then get no keys.
    """

    def __init__(self, match: Predicate, hold_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.match, self.hold_s, self.clock = match, hold_s, clock
        self.conns: OrderedDict[tuple[int, int], Conn] = OrderedDict()  # (pid, ssl) -> connection
        self.held: OrderedDict[tuple[int, int], tuple[float, list[Callable[[], None]]]] = OrderedDict()
        self.kept = self.dropped = self.unknown_dropped = 0  # sessions

    def connection(self, pid: int, ssl: int, conn: Conn) -> None:
        """From a handshake record: the session's connection; releases keys that waited for it."""
        key = (pid, ssl)
        self.conns[key] = conn
        self.conns.move_to_end(key)
        if len(self.conns) > 65536:
            self.conns.popitem(last=False)
        waiting = self.held.pop(key, None)
        if waiting is not None:
            for emit in waiting[1]:
                self._decide(conn, emit)

    def keys(self, pid: int, ssl: int, emit: Callable[[], None]) -> None:
        """A session's key lines: emit() runs now if its connection matches, later if unknown yet."""
        conn = self.conns.get((pid, ssl))
        if conn is not None:
            self._decide(conn, emit)
        else:
            self.held.setdefault((pid, ssl), (self.clock(), []))[1].append(emit)

    def expire(self, everything: bool = False) -> None:
        """Decide keys that waited longer than hold_s (all of them at the end of a run)."""
        limit = self.clock() - self.hold_s
        while self.held:
            key, (since, emits) = next(iter(self.held.items()))
            if not everything and since > limit:
                break
            del self.held[key]
            for emit in emits:
                if not self._decide(UNKNOWN_CONN, emit):
                    self.unknown_dropped += 1

    def _decide(self, conn: Conn, emit: Callable[[], None]) -> bool:
        if self.match(conn):
            self.kept += 1
            emit()
            return True
        self.dropped += 1
        return False


# --- packets: the kernel filter of -m pcapng -------------------------------------------------

@dataclass
class PacketFilter:
    """What tc_capture.bpf.c's cap_config holds: every non-empty part must match.
    proto 0 any, else IPPROTO_TCP/UDP; a packet matches the ports (hosts) when either end
    is one of them."""

    proto: int = 0
    ports: list[int] = field(default_factory=list)
    hosts: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(default_factory=list)


def _refuse(what: str) -> FilterError:
    return FilterError(f"{what} is not supported by the kernel packet filter of -m pcapng", None)


def compile_packet_filter(words: list[str] | None) -> PacketFilter:
    """The kernel packet filter for the expression; what it cannot express is refused."""
    f = PacketFilter()
    expr = parse(words)
    if expr is None:
        return f
    have_ports = have_hosts = False
    for part in _conjuncts(expr):
        kind, items = _alternatives(part)
        if kind == "proto":
            proto = socket.IPPROTO_TCP if items[0] == "tcp" else socket.IPPROTO_UDP
            if f.proto and f.proto != proto:
                raise FilterError("'tcp and udp' matches no packet", None)
            f.proto = proto
        elif kind == "port":
            if have_ports:
                raise _refuse("a second port condition joined with 'and'")
            have_ports, f.ports = True, items
        else:
            if have_hosts:
                raise _refuse("a second host condition joined with 'and'")
            have_hosts, f.hosts = True, items
    if len(f.ports) > MAX_PORTS or len(f.hosts) > MAX_HOSTS:
        raise FilterError(f"at most {MAX_PORTS} ports and {MAX_HOSTS} hosts in -m pcapng", None)
    return f


def _conjuncts(e: tuple) -> list[tuple]:
    return [c for x in e[1] for c in _conjuncts(x)] if e[0] == "and" else [e]


def _alternatives(e: tuple) -> tuple[str, list]:
    """(kind, values) of a primitive or an 'or' of primitives of one kind."""
    if e[0] == "or":
        found = [_alternatives(x) for x in e[1]]
        kinds = {k for k, _ in found}
        if len(kinds) != 1 or "proto" in kinds:
            raise FilterError("'or' is only supported between ports or between hosts in -m pcapng", None)
        return found[0][0], [v for _, vals in found for v in vals]
    if e[0] == "and":
        raise FilterError("'and' inside 'or' is not supported by the kernel packet filter of -m pcapng", None)
    if e[0] == "not":
        raise _refuse("'not'")
    if e[0] == "proto":
        if e[1] not in ("tcp", "udp"):
            raise _refuse(f"'{e[1]}'")
        return "proto", [e[1]]
    if e[0] == "net":
        raise _refuse("'net'")
    if e[1] is not None:
        raise _refuse(f"'{e[1]}'")
    if e[0] == "port":
        if e[4] == "portrange":
            raise _refuse("'portrange'")
        return "port", [e[2]]
    return "host", [e[2]]
