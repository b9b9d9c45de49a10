"""host/links.py: rtnetlink link notifications, from the real kernel (a veth pair made here)."""

import os
import select
import subprocess
import time

import pytest

from crypto_tracer.host import links


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a veth pair needs root")
def test_a_link_created_after_start_is_announced_with_its_index_and_name():
    name, peer = f"ctl{os.getpid() % 10000}a", f"ctl{os.getpid() % 10000}b"
    watcher = links.LinkWatcher()
    try:
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
        want = {socket_index(name): name, socket_index(peer): peer}
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 5
        while not want.items() <= seen.items() and time.monotonic() < deadline:
            select.select([watcher], [], [], 0.5)
            seen.update((index, name) for index, name, present in watcher.read() if present)
        assert want.items() <= seen.items()
        subprocess.run(["ip", "link", "del", name], check=True)  # takes its peer with it
        gone: set[int] = set()
        while not set(want) <= gone and time.monotonic() < deadline + 5:
            select.select([watcher], [], [], 0.5)
            gone.update(index for index, _name, present in watcher.read() if not present)
        assert set(want) <= gone
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
        watcher.close()


def socket_index(name: str) -> int:
    return int(open(f"/sys/class/net/{name}/ifindex").read())


def test_messages_are_parsed_and_others_ignored():
    import struct

    def msg(kind, body):
        return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body

    ifname = b"eth7\0"
    rta = struct.pack("=HH", 4 + len(ifname), links.IFLA_IFNAME) + ifname + b"\0" * 3  # padded to 4
    newlink = msg(links.RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 7, 0, 0) + struct.pack("=HH", 8, 4) + b"\0" * 4 + rta)
    dellink = msg(17, struct.pack("=BxHiII", 0, 1, 8, 0, 0) + rta)
    other = msg(20, struct.pack("=BxHiII", 0, 1, 9, 0, 0) + rta)  # RTM_NEWADDR: not a link
    assert links.link_changes(dellink + other + newlink) == [(8, "eth7", False), (7, "eth7", True)]
    assert links.link_changes(newlink[:-3]) == []  # a message cut short is not read past its end
