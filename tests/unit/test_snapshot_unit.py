"""snapshot's parsers and aggregation, on real /proc data and real files."""

import os
import shutil
import socket
import subprocess
import sys


from crypto_tracer.host import discovery, inventory, proc
from crypto_tracer.commands import snapshot
from crypto_tracer.sinks.snapshot_summary import render
from tests.harness import static_node


def test_parse_stat_with_parenthesis_in_comm():
    data = b"42 (a) b (c)) S 7 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0"
    assert proc.parse_stat(data) == ("a) b (c)", 7, 12345)


def test_own_process_is_seen():
    proc = inventory.scan_process(os.getpid())
    assert proc.pid == os.getpid() and proc.ppid == os.getppid()
    assert os.path.realpath(sys.executable) == proc.exe
    names = {lib["name"] for lib in proc.libraries}
    import ssl  # noqa: F401 - maps libssl into this process

    names = {lib["name"] for lib in inventory.scan_process(os.getpid()).libraries}
    assert {"libssl", "libcrypto"} <= names


def test_tcp_table_of_own_sockets():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        _, inodes = inventory.scan_fds(os.getpid())
        socks = inventory.TcpTables().sockets(os.getpid(), inodes)
        port = srv.getsockname()[1]
        assert {"local_addr": "127.0.0.1", "local_port": port, "remote_addr": "0.0.0.0", "remote_port": 0,
                "state": "LISTEN"} in socks
        assert {"local_addr": "127.0.0.1", "local_port": cli.getsockname()[1], "remote_addr": "127.0.0.1",
                "remote_port": port, "state": "ESTABLISHED"} in socks
    finally:
        for s in (cli, conn, srv):
            s.close()


def test_tcp6_address_decoding():
    line = (b"  sl  local_address rem_address   st\n"
            b"   0: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:D431 01 "
            b"00000000:00000000 00:00000000 00000000     0        0 777 1\n")
    assert proc.parse_tcp_table(line) == {777: {"local_addr": "::1", "local_port": 8080,
                                                     "remote_addr": "127.0.0.1", "remote_port": 54321,
                                                     "state": "ESTABLISHED"}}


def test_static_tls_detection_reads_exports_not_imports():
    openssl = shutil.which("openssl")  # imports SSL_write from libssl: not static
    assert discovery.exported(os.path.realpath(openssl), discovery.STATIC_TLS_SYMBOLS) == []
    node = static_node()
    info = discovery.static_tls(node)
    assert info["library"] == "openssl"
    assert {"SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex"} <= set(info["symbols"])
    version = subprocess.run([node, "-p", "process.versions.openssl"], capture_output=True, text=True).stdout
    assert info["version"] == version.strip().split("+")[0]


def test_summary_counts_unique_paths():
    lib = {"path": "/usr/lib/libssl.so.3", "name": "libssl", "version": "3.0.19"}
    f = {"path": "/etc/x.crt", "type": "certificate", "certificate": {"flags": ["expired", "not_quantum_safe"]}}

    def proc(pid):
        return {"pid": pid, "name": "p", "libraries": [lib], "open_crypto_files": [f], "static_tls": None,
                "container": None}

    s = snapshot.summarize([proc(1), proc(2)])
    assert s["total_processes"] == 2 and s["total_libraries"] == 1 and s["total_files"] == 1
    assert s["libraries"] == [{"path": lib["path"], "name": "libssl", "version": "3.0.19", "processes": 2}]
    assert s["files_by_type"] == {"certificate": 1}
    assert s["libraries_by_name"] == [{"name": "libssl", "version": "3.0.19", "files": 1, "processes": 2}]
    assert s["file_flags"] == {"expired": 1, "not_quantum_safe": 1}
    doc = {"generated_at": "2026-01-02T03:04:05.000000Z", "summary": s, "processes": [proc(1), proc(2)],
           "scan": {"processes_unreadable": 3}}
    text = render(doc)
    assert text.startswith("Crypto Snapshot Summary\nGenerated: 2026-01-02 03:04:05 UTC\n")
    assert "Total Processes: 2\nTotal Libraries: 1\nTotal Files: 1\n" in text
    assert "  PID 1: p (1 library, 1 file)" in text
    assert "  /usr/lib/libssl.so.3 3.0.19 (2 processes)" in text
    assert "  /etc/x.crt [certificate] (2 processes)" in text
    assert "  /etc/x.crt: expired" in text
    assert "Not readable: 3 processes" in text


def test_a_fifo_named_like_a_certificate_does_not_block(tmp_path):
    fifo = tmp_path / "trap.pem"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open by this process
    try:
        files, _ = inventory.scan_fds(os.getpid())  # must return, not block in open()
        assert str(fifo) not in [f["path"] for f in files]
    finally:
        os.close(fd)
