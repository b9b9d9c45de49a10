"""Network interfaces that appear while the tool runs (a container's veth, a VPN's tun), from
the kernel's rtnetlink link notifications: a TC classifier attached at start is on the interfaces
of that moment only. No polling of /sys: the kernel tells, and reading costs a syscall per poll.
"""

from __future__ import annotations

import errno
import socket
import struct

RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
NLMSG_DONE = 3
IFLA_IFNAME = 3
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_RTA = struct.Struct("=HH")  # rtattr: len, type


def _align4(n: int) -> int:
    return (n + 3) & ~3


def link_changes(data: bytes) -> list[tuple[int, str, bool]]:
    """(ifindex, name, present) of each RTM_NEWLINK (present) and RTM_DELLINK message in a
    datagram of rtnetlink messages. The kernel sends RTM_NEWLINK for a link created and for every
    change of an existing one: callers keep what they have seen."""
    out = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            break
        if kind in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSG.size + _IFINFO.size:
            _family, _type, index, _ifflags, _change = _IFINFO.unpack_from(data, off + _NLMSG.size)
            name = None
            a = off + _NLMSG.size + _IFINFO.size
            while a + _RTA.size <= off + length:
                alen, atype = _RTA.unpack_from(data, a)
                if alen < _RTA.size:
                    break
                if atype == IFLA_IFNAME:
                    name = data[a + _RTA.size:a + alen].split(b"\0", 1)[0].decode("utf-8", "replace")
                a += _align4(alen)
            if name and index > 0:
                out.append((index, name, kind == RTM_NEWLINK))
        off += _align4(length)
    return out


class LinkWatcher:
    """A non-blocking rtnetlink socket subscribed to link notifications."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[tuple[int, str, bool]]:
        """(ifindex, name, present) of the links announced since the last read (possibly again
        ones already known), in order."""
        out = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # the socket's buffer overflowed and notifications were lost: every link instead
                out.extend((index, name, True) for index, name in socket.if_nameindex())
            out.extend(link_changes(data))

    def close(self) -> None:
        self.sock.close()
