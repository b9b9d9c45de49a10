"""The trailing capture filter of `tls`: 'port 443', 'host 10.0.0.1', 'net 10.0.0.0/8',
optionally with 'src'/'dst', joined with 'and'/'or'/'not' and parentheses ('&&', '||', '!').

A connection is (local addr, local port, remote addr, remote port). 'host'/'port' match
either end; 'src' means the local end and 'dst' the remote end, as seen by the traced
process. Protocol words ('tcp', 'ip', 'ip6') match every TCP connection. An event whose
addresses are unknown never matches a filter that names an address or port.
"""

from __future__ import annotations

import ipaddress
from typing import Callable

from crypto_tracer.errors import ExitStatus, TracerError

Conn = tuple  # (local_addr, local_port, remote_addr, remote_port)
Predicate = Callable[[Conn], bool]

_ALIASES = {"&&": "and", "||": "or", "!": "not"}


class FilterError(TracerError):
    def __init__(self, message: str):
        super().__init__(f"capture filter: {message}", ExitStatus.BAD_ARGS,
                         "examples: 'port 443', 'host 127.0.0.1 and port 8443', 'not port 22'")


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

    def parse(self) -> Predicate:
        pred = self.or_expr()
        if self.peek() is not None:
            raise FilterError(f"unexpected '{self.peek()}'")
        return pred

    def or_expr(self) -> Predicate:
        parts = [self.and_expr()]
        while self.peek() == "or":
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else (lambda c: any(p(c) for p in parts))

    def and_expr(self) -> Predicate:
        parts = [self.unary()]
        while self.peek() is not None and self.peek() not in ("or", ")"):
            if self.peek() == "and":
                self.take()
            parts.append(self.unary())  # juxtaposition means 'and', as in tcpdump
        return parts[0] if len(parts) == 1 else (lambda c: all(p(c) for p in parts))

    def unary(self) -> Predicate:
        tok = self.peek()
        if tok == "not":
            self.take()
            inner = self.unary()
            return lambda c: not inner(c)
        if tok == "(":
            self.take()
            inner = self.or_expr()
            if self.take() != ")":
                raise FilterError("missing ')'")
            return inner
        return self.primitive()

    def primitive(self) -> Predicate:
        tok = self.take()
        if tok in ("tcp", "ip", "ip6"):
            return lambda c: True
        side = None
        if tok in ("src", "dst"):
            side, tok = tok, self.take()
        if tok == "port":
            port = _port(self.take())
            return _on_side(side, lambda addr, p: p == port)
        if tok == "portrange":
            lo, _, hi = self.take().partition("-")
            lo_p, hi_p = _port(lo), _port(hi)
            return _on_side(side, lambda addr, p: p is not None and lo_p <= p <= hi_p)
        if tok == "host":
            value = self.take()
            try:
                want = ipaddress.ip_address(value)
            except ValueError:
                raise FilterError(f"'{value}' is not an IP address") from None
            return _on_side(side, lambda addr, p: addr is not None and _same(addr, want))
        if tok == "net":
            value = self.take()
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise FilterError(f"'{value}' is not a network (e.g. 10.0.0.0/8)") from None
            return _on_side(side, lambda addr, p: addr is not None and _in(addr, net))
        raise FilterError(f"unknown word '{tok}'")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise FilterError(f"'{text}' is not a port number") from None
    if not 0 <= port <= 65535:
        raise FilterError(f"port {port} is out of range")
    return port


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


def compile_filter(words: list[str] | None) -> Predicate | None:
    """A predicate over (laddr, lport, raddr, rport), or None when there is no filter."""
    tokens = _tokens(list(words or []))
    if not tokens:
        return None
    return _Parser(tokens).parse()
