"""snapshot -f cyclonedx on the real host: a Python process holding an expired certificate and its key
with libssl loaded; TLS 1.3 handshakes of curl against Python's ssl, from a file written by
`tls -m json` and observed by `snapshot --observe`. Every CBOM is validated strictly against the
CycloneDX 1.6 schema here, independently of the tool's own validation."""

import json
import os
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e import tlspeers as tp
from tests.harness import Tracer, free_port, make_cert, need_root, need_tool, run_tracer

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"

HOLDER = r"""
import ssl, sys, time
held = [open(path, "rb") for path in sys.argv[1:]]  # a process that keeps its certificate and key open
print("ready", flush=True)
time.sleep(120)
"""


def strict(text: str) -> dict:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert error is None, error
    return json.loads(text)


def openssl_version() -> str:
    return subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True).stdout.split()[1]


def components(doc, **match):
    return [c for c in doc["components"] if all(c.get(k) == v for k, v in match.items())]


def by_ref(doc, ref):
    [found] = [c for c in doc["components"] if c["bom-ref"] == ref]
    return found


def cbom(*args) -> tuple[str, dict]:
    res = run_tracer(["snapshot", "-f", "cyclonedx", "--no-redact", *args], timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout, res


def test_expired_certificate_key_and_libssl(tmp_path):
    need_tool("openssl")
    cert, key = make_cert(tmp_path, "expired.cbom.e2e", -5, key=ec.generate_private_key(ec.SECP384R1()),
                          cert_name="expired.crt", key_name="expired.key", valid_since_days=100)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cert, key], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        out = str(tmp_path / "cbom.json")
        stdout, _ = cbom("-o", out)
        assert stdout == ""
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o600  # as every output file of the tool
        text = open(out).read()
        doc = strict(text)
        with open(f"/proc/{holder.pid}/maps") as f:
            assert LIBSSL in f.read()
    finally:
        holder.kill()
        holder.wait()
    from cryptography import x509

    real = x509.load_pem_x509_certificate(open(cert, "rb").read())
    # the expired certificate: validity, key type, where and in which process
    [c] = components(doc, name="expired.cbom.e2e")
    cp = c["cryptoProperties"]["certificateProperties"]
    assert cp["subjectName"] == "CN=expired.cbom.e2e"
    assert cp["notValidAfter"] == real.not_valid_after_utc.isoformat()
    assert cp["notValidBefore"] == real.not_valid_before_utc.isoformat()
    assert cp["certificateFormat"] == "X.509"
    assert {"name": "crypto-tracer:flag", "value": "expired"} in c["properties"]
    assert c["evidence"]["occurrences"] == [{"location": cert, "additionalContext":
                                             f"open in pid {holder.pid} ({os.path.basename(sys.executable)[:15]})"}]
    pub = by_ref(doc, cp["subjectPublicKeyRef"])["cryptoProperties"]["relatedCryptoMaterialProperties"]
    assert pub["type"] == "public-key" and pub["size"] == 384
    alg = by_ref(doc, pub["algorithmRef"])
    assert alg["name"] == "EC-secp384r1"
    assert alg["cryptoProperties"]["algorithmProperties"]["curve"] == "secp384r1"
    assert alg["cryptoProperties"]["algorithmProperties"]["classicalSecurityLevel"] == 192
    assert alg["cryptoProperties"]["algorithmProperties"]["nistQuantumSecurityLevel"] == 0
    assert by_ref(doc, cp["signatureAlgorithmRef"])["name"] == "SHA256withECDSA"
    # its private key: related crypto material, type and size, never the material
    [k] = [c for c in doc["components"] if any(o["location"] == key for o in c.get("evidence", {}).get("occurrences", []))]
    rcm = k["cryptoProperties"]["relatedCryptoMaterialProperties"]
    assert k["cryptoProperties"]["assetType"] == "related-crypto-material"
    assert rcm == {"type": "private-key", "size": 384, "algorithmRef": pub["algorithmRef"]}
    deps = {d["ref"]: d.get("dependsOn", []) for d in doc["dependencies"]}
    assert cp["subjectPublicKeyRef"] in deps[k["bom-ref"]]  # the key of that certificate
    pem_body = "".join(open(key).read().splitlines()[1:-1])
    assert pem_body[:32] not in text.replace("\n", "").replace("\\n", "")
    # libssl with the system OpenSSL's version, found at its path in this process
    version = openssl_version()
    lib = by_ref(doc, f"crypto/library/libssl@{version}")
    assert lib["type"] == "library" and lib["name"] == "libssl" and lib["version"] == version
    [occ] = [o for o in lib["evidence"]["occurrences"] if o["location"] == LIBSSL]
    assert f"mapped by pid {holder.pid} " in occ["additionalContext"]
    procs = [json.loads(p["value"]) for p in lib["properties"] if p["name"] == "crypto-tracer:process"]
    assert {"pid": holder.pid, "ppid": os.getpid(), "exe": os.path.realpath(sys.executable)}.items() <= \
        [p for p in procs if p["pid"] == holder.pid][0].items()
    host = doc["metadata"]["component"]
    assert host["type"] == "operating-system" and host["version"] == os.uname().release


def protocol(doc, version):
    found = components(doc, name=f"TLSv{version}")
    assert found, f"no TLS {version} protocol in {[c['name'] for c in doc['components']]}"
    return found[0]


def check_tls13(doc, events, server_pid, curl_pids):
    """The TLS 1.3 protocol entry of curl's handshakes (and the server's, which made libssl provide it)."""
    proto = protocol(doc, "1.3")
    pp = proto["cryptoProperties"]["protocolProperties"]
    assert pp["type"] == "tls" and pp["version"] == "1.3"
    contexts = " ".join(o.get("additionalContext", "") for o in proto["evidence"]["occurrences"])
    for pid in curl_pids:
        assert f"pid {pid} (" in contexts
    assert os.path.realpath(tp.peer("curl")) in {o["location"] for o in proto["evidence"]["occurrences"]}
    ciphers = {e["cipher"] for e in events if e["event_type"] == "tls_handshake" and e["pid"] in curl_pids
               and e.get("cipher")}
    if ciphers:  # the handshake facts name the suite (the hello parser); the library hooks alone do not
        from crypto_tracer.host.algorithms import cipher_suite

        assert {s["name"] for s in pp["cipherSuites"]} >= {cipher_suite(c).name for c in ciphers}
        for s in pp["cipherSuites"]:
            if s["name"] in ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"):
                assert s["identifiers"][0] == "0x13" and len(s["identifiers"]) == 2
    version = openssl_version()
    provides = {d["ref"]: d.get("provides", []) for d in doc["dependencies"]}
    assert "crypto/protocol/tls@1.3" in provides[f"crypto/library/libssl@{version}"]  # the server's handshakes
    procs = [json.loads(p["value"]) for p in proto["properties"] if p["name"] == "crypto-tracer:process"]
    assert server_pid in {p["pid"] for p in procs}


@pytest.fixture
def server(rsa_certs):
    need_root()
    need_tool("openssl", "curl")
    cert, key = rsa_certs
    port = free_port()
    with tp.python_server(port, cert, key, "") as srv:
        yield srv, port


@pytest.mark.ebpf
def test_handshakes_file_from_tls_json(server, tmp_path):
    srv, port = server
    events_file = str(tmp_path / "tls.json")
    tracer = tp.tls_tracer(["-m", "json", "-o", events_file])
    pids = [tp.curl(f"https://127.0.0.1:{port}/x") for _ in range(2)]
    _, err, rc = tracer.stop(settle=[port])
    assert rc == 0, err
    events = tp.read_events(events_file)
    assert {(e["pid"], e["tls_version"]) for e in events if e["event_type"] == "tls_handshake" and e["pid"] in pids} \
        == {(pid, "TLSv1.3") for pid in pids}
    text, _ = cbom("--handshakes", events_file)
    check_tls13(strict(text), events, srv.pid, pids)


@pytest.mark.ebpf
def test_observe(server, tmp_path):
    srv, port = server
    out = str(tmp_path / "cbom.json")
    # READY is the observing tls child's, once its probes are attached; SIGINT ends the observation early
    run = Tracer(["snapshot", "-f", "cyclonedx", "--no-redact", "--observe", "60", "-o", out])
    pids = [tp.curl(f"https://127.0.0.1:{port}/x") for _ in range(2)]
    _, err, rc = run.stop(settle=[port])
    assert rc == 0, err
    doc = strict(open(out).read())
    check_tls13(doc, [], srv.pid, pids)
