"""The OTLP logs sink against real receivers: rotel (OTLP/HTTP and gRPC), a TLS and a client-certificate
endpoint, an endpoint that is down and one that never answers. No privileges needed."""

from __future__ import annotations

import json
import socket
import time

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the agent extra (./setup test installs it)")

from crypto_tracer import __version__  # noqa: E402
from crypto_tracer.errors import TracerError  # noqa: E402
from crypto_tracer.pipeline.events import FILE_OPEN, LIB_LOAD, PROCESS_EXEC, TLS_HANDSHAKE  # noqa: E402
from crypto_tracer.sinks.otlp import OtlpSink, attributes, timestamp_ns  # noqa: E402
from tests.otlp_receiver import Collector, Rotel  # noqa: E402

HOST = socket.gethostname()

EXEC = PROCESS_EXEC.build(timestamp="2026-11-27T19:00:00.000001Z", pid=4242, ppid=1, uid=33, process="curl",
                          exe="/usr/bin/curl", root="/", mnt_ns=4026531841, cmdline="curl -s https://example.org/")
OPEN = FILE_OPEN.build(timestamp="2026-11-27T19:00:01.123456Z", pid=4242, ppid=1, uid=33, process="curl",
                       exe="/usr/bin/curl", root="/", mnt_ns=4026531841, file="/etc/ssl/certs/ca-certificates.crt",
                       file_type="certificate", flags="O_RDONLY|O_CLOEXEC", result=5)
LIB = LIB_LOAD.build(timestamp="2026-11-27T19:00:02.000000Z", pid=4242, ppid=1, uid=33, process="curl",
                     exe="/usr/bin/curl", root="/", mnt_ns=4026531841, library="/usr/lib/x86_64-linux-gnu/libssl.so.3",
                     library_name="libssl", version=None)
HANDSHAKE = TLS_HANDSHAKE.build(timestamp="2026-11-27T19:00:03.500000Z", pid=4242, ppid=1, uid=33, process="curl",
                                exe="/usr/bin/curl", tid=4243, library="openssl", role="client", fd=5,
                                local_addr="127.0.0.1", local_port=50000, remote_addr="127.0.0.1", remote_port=8443,
                                result="success", tls_version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384")

COMMON_ATTRS = {"process.pid": 4242, "process.parent_pid": 1, "process.user.id": 33,
                "process.executable.path": "/usr/bin/curl", "process.executable.name": "curl",
                "crypto_tracer.process.comm": "curl"}
VIEW_ATTRS = {"crypto_tracer.process.root": "/", "crypto_tracer.process.mnt_ns": 4026531841}
EXPECTED_ATTRS = {
    "process_exec": {**COMMON_ATTRS, **VIEW_ATTRS, "process.command_line": "curl -s https://example.org/"},
    "file_open": {**COMMON_ATTRS, **VIEW_ATTRS, "file.path": "/etc/ssl/certs/ca-certificates.crt",
                  "crypto_tracer.file.type": "certificate"},
    "lib_load": {**COMMON_ATTRS, **VIEW_ATTRS, "file.path": "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                 "crypto_tracer.library.name": "libssl"},
    "tls_handshake": {**COMMON_ATTRS, "thread.id": 4243, "crypto_tracer.library": "openssl",
                      "tls.protocol.name": "tls", "tls.protocol.version": "1.3", "tls.cipher": "TLS_AES_256_GCM_SHA384",
                      "tls.established": True,
                      "network.local.address": "127.0.0.1", "network.local.port": 50000,
                      "network.peer.address": "127.0.0.1", "network.peer.port": 8443,
                      "client.address": "127.0.0.1", "client.port": 50000,
                      "server.address": "127.0.0.1", "server.port": 8443},
}


def check_record(rec: dict, event: dict, written_after_ns: int) -> None:
    assert rec["event_name"] == event["event_type"]
    assert json.loads(rec["body"]) == event  # the whole event as JSON text, nulls kept as nulls
    assert rec["attributes"] == EXPECTED_ATTRS[event["event_type"]]
    assert rec["time_unix_nano"] == timestamp_ns(event["timestamp"])
    assert rec["observed_time_unix_nano"] >= written_after_ns
    assert rec["severity_number"] == 0  # events have no severity: unspecified, not guessed
    assert rec["scope"] == ("crypto_tracer", __version__)
    res = rec["resource"]
    assert (res["service.name"], res["service.version"], res["host.name"]) == ("crypto-tracer", __version__, HOST)
    assert res["deployment.environment.name"] == "test"  # configured extra resource attribute


@pytest.fixture
def rotel(tmp_path):
    r = Rotel(str(tmp_path))
    yield r
    r.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_records_reach_rotel_field_by_field(rotel, protocol):
    url = rotel.http_url if protocol == "http" else rotel.grpc_url
    sink = OtlpSink(url, protocol=protocol, resource={"deployment.environment.name": "test"})
    before = time.time_ns()
    events = [EXEC, OPEN, LIB, HANDSHAKE]
    for ev in events:
        assert sink.write(ev) is True
    assert sink.flush(20) is True
    assert sink.stats() == {"sent": 4, "dropped": 0, "queued": 0, "failed": 0}
    records = rotel.collector.wait(4)
    assert len(records) == 4
    by_name = {r["event_name"]: r for r in records}
    for ev in events:
        check_record(by_name[ev["event_type"]], ev, before)
    # rotel's own debug log shows the records it received
    log = rotel.debug_log()
    assert "EventName: tls_handshake" in log and "tls.cipher: Str(TLS_AES_256_GCM_SHA384)" in log
    assert sink.close() == {"sent": 4, "dropped": 0, "queued": 0, "failed": 0}


def make_pki(directory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed: name -> path."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test collector CA")])
    paths = {}

    def issue(name, key, subject, issuer_key, extensions):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        paths[name] = os.path.join(directory, f"{name}.pem")
        with open(paths[name], "wb") as f:
            f.write(b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = os.path.join(directory, f"{name}.key")
        with open(paths[f"{name}_key"], "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    issue("ca", ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True),
                                          (x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                           True), (ski, False)])
    for name, cn, usage, san in (("server", "127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
                                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                 ("client", "crypto-tracer-agent", ExtendedKeyUsageOID.CLIENT_AUTH,
                                  [x509.DNSName("crypto-tracer-agent")])):
        key = ec.generate_private_key(ec.SECP256R1())
        issue(name, key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), ca_key,
              [(x509.BasicConstraints(ca=False, path_length=None), True),
               (x509.ExtendedKeyUsage([usage]), False), (x509.SubjectAlternativeName(san), False), (aki, False)])
    return paths


def test_tls_and_client_certificate(tmp_path):
    pki = make_pki(str(tmp_path))
    client_cert, client_key = pki["client"], pki["client_key"]
    collector = Collector(tls=(pki["server"], pki["server_key"]), client_ca=pki["ca"])
    try:
        sink = OtlpSink(collector.url, ca_file=pki["ca"], cert_file=client_cert, key_file=client_key,
                        resource={"deployment.environment.name": "test"}, headers={"authorization": "Bearer t"})
        before = time.time_ns()
        sink.write(OPEN)
        assert sink.flush(20)
        check_record(collector.wait(1)[0], OPEN, before)
        assert sink.close() == {"sent": 1, "dropped": 0, "queued": 0, "failed": 0}

        # the collector's certificate is not trusted (no ca_file): nothing sent, the failure counted
        untrusting = OtlpSink(collector.url, cert_file=client_cert, key_file=client_key, export_timeout=2)
        untrusting.write(OPEN)
        untrusting.flush(20)
        assert untrusting.close() == {"sent": 0, "dropped": 0, "queued": 0, "failed": 1}
        assert len(collector.records) == 1
    finally:
        collector.close()


def test_rejected_batches_are_counted_failed():
    collector = Collector(status=400)  # a permanent error: not retried
    try:
        sink = OtlpSink(collector.url, batch_size=2)
        for ev in (EXEC, OPEN, LIB):
            sink.write(ev)
        sink.flush(20)
        assert sink.close() == {"sent": 0, "dropped": 0, "queued": 0, "failed": 3}
        assert collector.requests == 2 and collector.records == []
    finally:
        collector.close()


def _hung_endpoint():
    """A port that accepts connections and never answers (a stuck collector)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


@pytest.mark.parametrize("down", ["refused", "hung"])
def test_endpoint_down_never_blocks_and_counts(down):
    if down == "hung":
        sock = _hung_endpoint()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        sink = OtlpSink(url, queue_size=50, batch_size=10, batch_delay=0.05, export_timeout=1.5)
        n = 5000
        start = time.monotonic()
        accepted = sum(sink.write(dict(OPEN, pid=i)) for i in range(n))
        elapsed = time.monotonic() - start
        # never blocks: 5000 writes while the sender is stuck take far less than one export timeout
        assert elapsed < 1.0, f"{n} writes took {elapsed:.2f} s"
        st = sink.stats()
        assert st["sent"] == 0
        assert accepted <= 50 + 10  # the queue, plus at most one batch taken off it
        assert st["dropped"] == n - accepted
        # close gives up after its timeout: what never left is dropped, every event accounted for
        start = time.monotonic()
        final = sink.close(timeout=1.0)
        assert time.monotonic() - start < 6.0  # flush timeout + the exporter's aborted retry + join
        assert final["sent"] == 0 and final["queued"] == 0
        assert final["failed"] + final["dropped"] == n
        assert sink.write(OPEN) is False and sink.stats()["dropped"] == final["dropped"] + 1
    finally:
        sock.close()


def test_attribute_mapping():
    server_side = dict(HANDSHAKE, role="server", tls_version="TLSv1.2", result="failure", sni="example.org",
                       alpn="h2", group="X25519MLKEM768", resumed=False, peer_cert_subject="CN=client",
                       cipher=None)
    a = attributes(server_side)
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == 50000  # we are the server
    assert a["client.port"] == 8443
    assert a["tls.protocol.version"] == "1.2" and a["tls.established"] is False
    assert a["tls.client.server_name"] == "example.org" and a["tls.next_protocol"] == "h2"
    assert a["tls.curve"] == "X25519MLKEM768" and a["tls.resumed"] is False
    assert a["tls.client.subject"] == "CN=client" and "tls.server.subject" not in a
    assert "tls.cipher" not in a  # unknown: absent, never null
    unknown_role = attributes(dict(HANDSHAKE, role=None, tls_version=None))
    assert "server.address" not in unknown_role and unknown_role["network.peer.port"] == 8443
    assert "tls.protocol.name" not in unknown_role
    assert timestamp_ns("2026-11-27T19:00:01.123456Z") == 1795806001123456000
    assert timestamp_ns(None) is None


def test_bad_configuration_is_one_clear_error(tmp_path):
    with pytest.raises(TracerError, match="expected http or grpc"):
        OtlpSink("http://127.0.0.1:4318", protocol="udp")
    with pytest.raises(TracerError, match="expected http://HOST:PORT"):
        OtlpSink("127.0.0.1:4318")
    with pytest.raises(TracerError, match="give both cert_file and key_file"):
        OtlpSink("https://127.0.0.1:4318", cert_file=str(tmp_path / "c.pem"))
    with pytest.raises(TracerError, match="not readable"):
        OtlpSink("https://127.0.0.1:4318", ca_file=str(tmp_path / "missing.pem"))
