"""A small pcapng writer: section header, one interface block per captured interface,
enhanced packet blocks (with direction flags and a per-packet comment), and Decryption
Secrets Blocks carrying TLS key log lines, so Wireshark decrypts the file on its own.

Every block is written whole; the file is valid after each write (pcapng has no trailer).
"""

from __future__ import annotations

import struct

from crypto_tracer.sinks.output import Output

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
DSB_TYPE = 0x0000000A
BYTE_ORDER_MAGIC = 0x1A2B3C4D
SECRETS_TLS_KEYLOG = 0x544C534B

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101

OPT_END = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
SHB_OS = 3
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2
INBOUND = 1
OUTBOUND = 2


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _options(opts: list[bytes]) -> bytes:
    return b"".join(opts) + struct.pack("<HH", OPT_END, 0) if opts else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


class PcapngWriter:
    def __init__(self, path: str, application: str = "crypto-tracer", os_name: str = "Linux"):
        self._out = Output(path)
        self._interfaces: dict[str, int] = {}
        body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1)
        body += _options([_option(SHB_OS, os_name.encode()), _option(SHB_USERAPPL, application.encode())])
        self._out.write(_block(SHB_TYPE, body))
        self.packets = 0
        self.secrets_blocks = 0

    def add_interface(self, name: str, linktype: int = LINKTYPE_ETHERNET, snaplen: int = 262144) -> int:
        """Write an IDB (nanosecond timestamps); returns its interface id."""
        if name in self._interfaces:
            return self._interfaces[name]
        body = struct.pack("<HHI", linktype, 0, snaplen)
        body += _options([_option(IF_NAME, name.encode()), _option(IF_TSRESOL, bytes([9]))])
        self._out.write(_block(IDB_TYPE, body))
        self._interfaces[name] = len(self._interfaces)
        return self._interfaces[name]

    def add_secrets(self, keylog: bytes) -> None:
        """A DSB with TLS key log lines; it must precede the packets it decrypts."""
        if not keylog:
            return
        body = struct.pack("<II", SECRETS_TLS_KEYLOG, len(keylog)) + _pad4(keylog)
        self._out.write(_block(DSB_TYPE, body))
        self.secrets_blocks += 1

    def add_packet(self, interface_id: int, ts_epoch_ns: int, data: bytes, orig_len: int | None = None,
                   outbound: bool | None = None, comment: str | None = None) -> None:
        orig = len(data) if orig_len is None else orig_len
        body = struct.pack("<IIIII", interface_id, ts_epoch_ns >> 32, ts_epoch_ns & 0xFFFFFFFF, len(data), orig)
        body += _pad4(data)
        opts = []
        if outbound is not None:
            opts.append(_option(EPB_FLAGS, struct.pack("<I", OUTBOUND if outbound else INBOUND)))
        if comment:
            opts.append(_option(OPT_COMMENT, comment.encode(errors="replace")))
        body += _options(opts)
        self._out.write(_block(EPB_TYPE, body))
        self.packets += 1

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self._out.close()
