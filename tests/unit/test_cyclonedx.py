"""snapshot -f cyclonedx: the CBOM of a constructed inventory (its certificate and key insight read by
certinfo from real files), checked strictly against the CycloneDX 1.6 schema and field by field."""

import json
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from crypto_tracer.commands import snapshot
from crypto_tracer.errors import TracerError
from crypto_tracer.host import algorithms as algs
from crypto_tracer.host import certinfo
from crypto_tracer.sinks import cyclonedx
from tests.harness import make_cert

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def strict_errors(text: str):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    return JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cbom")
    expired, expired_key = make_cert(d, "expired.cbom.test", -3, key=ec.generate_private_key(ec.SECP256R1()),
                                     cert_name="expired.crt", key_name="expired.key", serial=0x4242,
                                     valid_since_days=60)
    rsa, rsa_key = make_cert(d, "rsa.cbom.test", 90, rsa_bits=2048, cert_name="rsa.pem", key_name="rsa.key",
                             serial=0x99)
    garbage = d / "garbage.crt"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    ca1, _ = make_cert(d, "ca1.cbom.test", 400, cert_name="ca1.crt", key_name="ca1.key")
    ca2, _ = make_cert(d, "ca2.cbom.test", 10, rsa_bits=3072, cert_name="ca2.crt", key_name="ca2.key")
    bundle = d / "bundle.pem"
    bundle.write_bytes(open(ca1, "rb").read() + open(ca2, "rb").read())
    return {"expired": expired, "expired_key": expired_key, "rsa": rsa, "rsa_key": rsa_key, "garbage": str(garbage),
            "bundle": str(bundle)}


def inventory(files) -> dict:
    """A snapshot document as take_snapshot builds it: two processes share libssl and the expired
    certificate; one holds its private key; a Go program has static TLS."""
    def entry(path, ftype):  # as the snapshot makes it for the CBOM (bundles in full)
        return snapshot.file_entry({"path": path, "type": ftype, "read_path": path}, cbom=True)

    libs = [{"path": LIBSSL, "name": "libssl", "version": "3.0.19"},
            {"path": "/usr/lib/x86_64-linux-gnu/libcrypto.so.3", "name": "libcrypto", "version": "3.0.19"}]
    server = {"pid": 100, "ppid": 1, "name": "server", "exe": "/usr/bin/python3.11", "root": "/",
              "cmdline": "python3 server.py", "running_as": "root", "uid": 0, "libraries": libs,
              "open_crypto_files": [entry(files["expired"], "certificate"), entry(files["expired_key"], "private_key")],
              "static_tls": None, "tls_sockets": [], "container": None}
    other = dict(server, pid=200, name="worker", cmdline="worker",
                 open_crypto_files=[entry(files["expired"], "certificate"), entry(files["rsa"], "certificate"),
                                    {"path": "/etc/app/store.p12", "type": "keystore"},
                                    entry(files["garbage"], "certificate"), entry(files["bundle"], "certificate")])
    gosrv = dict(server, pid=300, name="gosrv", exe="/usr/local/bin/gosrv", libraries=[], open_crypto_files=[],
                 static_tls={"library": "go", "symbols": ["crypto/tls.(*Conn).Write"], "version": "go1.22.10"})
    return {"snapshot_version": "1.1", "generated_at": "2026-11-27T19:00:00.123456Z", "hostname": "cbom-host",
            "kernel": "6.18.0", "scan": {"privileged": True, "processes_scanned": 10, "processes_unreadable": 0,
                                         "duration_ms": 1.0},
            "processes": [server, other, gosrv], "summary": {}}


HANDSHAKES = [
    {"event_type": "tls_handshake", "pid": 100, "process": "server", "exe": "/usr/bin/python3.11", "uid": 0,
     "library": "openssl", "role": "server", "result": "success", "tls_version": "TLSv1.3",
     "cipher": "TLS_AES_256_GCM_SHA384", "group": "X25519MLKEM768"},
    {"event_type": "tls_handshake", "pid": 300, "process": "gosrv", "exe": "/usr/local/bin/gosrv", "uid": 0,
     "library": "go", "role": "server", "result": "success", "tls_version": "TLSv1.2",
     "cipher": "ECDHE-RSA-AES128-GCM-SHA256", "group": "x25519", "peer_key_type": "RSA", "peer_key_bits": 2048},
    {"event_type": "tls_handshake", "pid": 100, "process": "server", "exe": "/usr/bin/python3.11", "uid": 0,
     "library": "openssl", "role": "server", "result": "success", "tls_version": "TLSv1.2",
     "cipher": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "group": "secp256r1"},  # a server: peer key unseen
    {"event_type": "tls_handshake", "pid": 999, "process": "gone", "exe": "/usr/bin/curl", "uid": 0,
     "library": "openssl", "role": "client", "result": "success", "tls_version": "TLSv1.3", "cipher": None},
    {"event_type": "tls_handshake", "pid": 100, "library": "openssl", "result": "failure", "tls_version": "TLSv1.1"},
    {"event_type": "tls_handshake", "pid": 400, "process": "old", "exe": "/opt/old", "library": "openssl",
     "result": "success", "tls_version": "SSLv3", "cipher": "AES128-SHA"},
    {"event_type": "tls_handshake", "pid": 401, "process": "quiet", "exe": "/opt/quiet", "library": "boringssl",
     "result": "success", "tls_version": None, "cipher": None},
    {"event_type": "tls_data", "pid": 100},
]


@pytest.fixture(scope="module")
def cbom(files):
    text = cyclonedx.build(inventory(files), HANDSHAKES)
    assert strict_errors(text) is None
    return text, json.loads(text), files


def comp(doc, ref):
    found = [c for c in doc["components"] if c["bom-ref"] == ref]
    assert found, f"{ref} not in {[c['bom-ref'] for c in doc['components']]}"
    return found[0]


def refs_named(doc, name):
    return [c["bom-ref"] for c in doc["components"] if c["name"] == name]


def test_document_frame(cbom):
    _, doc, _ = cbom
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6" and doc["version"] == 1
    assert doc["serialNumber"].startswith("urn:uuid:")
    meta = doc["metadata"]
    assert meta["timestamp"].startswith("2026-11-27T19:00:00.123456")
    assert meta["component"] == {"bom-ref": "host/cbom-host", "description": "host cbom-host", "name": "linux",
                                 "type": "operating-system", "version": "6.18.0"}
    assert meta["tools"]["components"][0]["name"] == "crypto-tracer"
    props = {p["name"]: p["value"] for p in meta["properties"]}
    assert props["crypto-tracer:processes_scanned"] == "10" and props["crypto-tracer:handshakes_read"] == "8"


def test_libraries_with_versions_paths_and_processes(cbom):
    _, doc, _ = cbom
    lib = comp(doc, "crypto/library/libssl@3.0.19")
    assert lib["type"] == "library" and lib["name"] == "libssl" and lib["version"] == "3.0.19"
    assert lib["evidence"]["occurrences"] == [{"location": LIBSSL, "additionalContext":
                                               "mapped by pid 100 (server); mapped by pid 200 (worker)"}]
    procs = [json.loads(p["value"]) for p in lib["properties"] if p["name"] == "crypto-tracer:process"]
    assert sorted(p["pid"] for p in procs) == [100, 200]
    assert {"pid": 100, "ppid": 1, "name": "server", "exe": "/usr/bin/python3.11", "uid": 0, "user": "root"} in procs
    go = comp(doc, "crypto/library/go-static@go1.22.10")
    assert go["name"] == "go (static)" and go["evidence"]["occurrences"][0]["location"] == "/usr/local/bin/gosrv"


def test_expired_certificate(cbom):
    _, doc, files = cbom
    info = certinfo.describe(files["expired"], "certificate")
    [ref] = refs_named(doc, "expired.cbom.test")
    cert = comp(doc, ref)
    assert cert["type"] == "cryptographic-asset"
    props = cert["cryptoProperties"]
    assert props["assetType"] == "certificate"
    cp = props["certificateProperties"]
    assert cp["subjectName"] == "CN=expired.cbom.test" and cp["issuerName"] == "CN=expired.cbom.test"
    assert cp["notValidAfter"].replace("+00:00", "Z") == info["not_after"]
    assert cp["notValidBefore"].replace("+00:00", "Z") == info["not_before"]
    assert cp["certificateFormat"] == "X.509" and cp["certificateExtension"] == "crt"
    sig = comp(doc, cp["signatureAlgorithmRef"])
    assert sig["name"] == "SHA256withECDSA"
    assert sig["cryptoProperties"]["oid"] == "1.2.840.10045.4.3.2"
    assert sig["cryptoProperties"]["algorithmProperties"]["primitive"] == "signature"
    assert sig["cryptoProperties"]["algorithmProperties"]["nistQuantumSecurityLevel"] == 0
    key = comp(doc, cp["subjectPublicKeyRef"])
    rcm = key["cryptoProperties"]["relatedCryptoMaterialProperties"]
    assert key["cryptoProperties"]["assetType"] == "related-crypto-material"
    assert rcm["type"] == "public-key" and rcm["size"] == 256
    alg = comp(doc, rcm["algorithmRef"])
    assert alg["name"] == "EC-secp256r1"
    assert alg["cryptoProperties"]["algorithmProperties"] == {
        "primitive": "signature", "curve": "secp256r1", "classicalSecurityLevel": 128,
        "nistQuantumSecurityLevel": 0, "cryptoFunctions": ["sign", "verify"]}
    flags = sorted(p["value"] for p in cert["properties"] if p["name"] == "crypto-tracer:flag")
    assert flags == ["expired", "not_quantum_safe"]
    # found once, in the two processes that hold it
    assert cert["evidence"]["occurrences"] == [{"location": files["expired"], "additionalContext":
                                                "open in pid 100 (server); open in pid 200 (worker)"}]
    deps = {d["ref"]: d for d in doc["dependencies"]}
    assert sorted(deps[ref]["dependsOn"]) == sorted([cp["signatureAlgorithmRef"], cp["subjectPublicKeyRef"]])


def test_private_key_without_material(cbom):
    text, doc, files = cbom
    keys = [c for c in doc["components"]
            if c.get("cryptoProperties", {}).get("relatedCryptoMaterialProperties", {}).get("type") == "private-key"]
    assert len(keys) == 1
    key = keys[0]
    rcm = key["cryptoProperties"]["relatedCryptoMaterialProperties"]
    assert set(rcm) == {"type", "size", "algorithmRef"}  # never "value"
    assert rcm["size"] == 256 and comp(doc, rcm["algorithmRef"])["name"] == "EC-secp256r1"
    assert key["evidence"]["occurrences"] == [{"location": files["expired_key"],
                                               "additionalContext": "open in pid 100 (server)"}]
    assert {"name": "crypto-tracer:encrypted", "value": "false"} in key["properties"]
    # matched to the certificate of its key by the public key's SHA-256 (not material: a name of it)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    import hashlib

    cert = x509.load_pem_x509_certificate(open(files["expired"], "rb").read())
    spki = hashlib.sha256(cert.public_key().public_bytes(serialization.Encoding.DER,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    assert {"name": "crypto-tracer:public_key_sha256", "value": spki} in key["properties"]
    [cert_ref] = refs_named(doc, "expired.cbom.test")
    public_ref = comp(doc, cert_ref)["cryptoProperties"]["certificateProperties"]["subjectPublicKeyRef"]
    assert public_ref == f"crypto/key/public-key-ec-secp256r1@{spki[:16]}"
    deps = {d["ref"]: d.get("dependsOn", []) for d in doc["dependencies"]}
    assert public_ref in deps[key["bom-ref"]]
    pem = open(files["expired_key"]).read()
    body = "".join(pem.splitlines()[1:-1])
    assert body[:40] not in text.replace("\n", "")


def test_rsa_certificate_algorithm_levels(cbom):
    _, doc, _ = cbom
    rsa = comp(doc, "crypto/algorithm/rsa-2048@1.2.840.113549.1.1.1")
    assert rsa["cryptoProperties"]["algorithmProperties"] == {
        "primitive": "pke", "parameterSetIdentifier": "2048", "classicalSecurityLevel": 112,
        "nistQuantumSecurityLevel": 0}
    sig = comp(doc, "crypto/algorithm/sha256withrsa@1.2.840.113549.1.1.11")
    assert sig["name"] == "SHA256withRSA"


def test_other_crypto_files(cbom):
    _, doc, _ = cbom
    [store] = [c for c in doc["components"] if c["name"] == "keystore store.p12"]
    assert store["cryptoProperties"]["relatedCryptoMaterialProperties"] == {"type": "other"}
    assert store["evidence"]["occurrences"][0]["location"] == "/etc/app/store.p12"
    [garbage] = [c for c in doc["components"] if c["name"] == "garbage.crt"]  # not parsed: named, not guessed
    assert garbage["cryptoProperties"] == {"assetType": "certificate", "certificateProperties": {
        "certificateFormat": "X.509", "certificateExtension": "crt"}}
    assert {"name": "crypto-tracer:error", "value": "not parsed"} in garbage["properties"]


def test_protocols_suites_and_provides(cbom):
    _, doc, _ = cbom
    tls13 = comp(doc, "crypto/protocol/tls@1.3")
    pp = tls13["cryptoProperties"]["protocolProperties"]
    assert pp["type"] == "tls" and pp["version"] == "1.3"
    assert [s["name"] for s in pp["cipherSuites"]] == ["TLS_AES_256_GCM_SHA384"]
    suite = pp["cipherSuites"][0]
    assert suite["identifiers"] == ["0x13", "0x02"]
    assert sorted(comp(doc, r)["name"] for r in suite["algorithms"]) == ["AES-256-GCM", "SHA-384"]
    hybrid = comp(doc, pp["cryptoRefArray"][0])
    assert hybrid["name"] == "X25519MLKEM768"
    assert hybrid["cryptoProperties"]["algorithmProperties"]["nistQuantumSecurityLevel"] == 3
    # the failed TLS 1.1 attempt and the tls_data event are not protocols in use
    assert {p["value"] for p in tls13["properties"] if p["name"] == "crypto-tracer:handshakes"} == {"2"}
    assert not [c for c in doc["components"] if c["bom-ref"] == "crypto/protocol/tls@1.1"]
    tls12 = comp(doc, "crypto/protocol/tls@1.2")["cryptoProperties"]["protocolProperties"]
    [s12] = tls12["cipherSuites"]
    assert s12["name"] == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" and s12["identifiers"] == ["0xC0", "0x2F"]
    # the RSA key one handshake showed stands for the suite's authentication: no family-only "RSA" beside it
    assert sorted(comp(doc, r)["name"] for r in s12["algorithms"]) == \
        ["AES-128-GCM", "ECDH-secp256r1", "RSA-2048", "SHA-256", "X25519"]
    assert sorted(comp(doc, r)["name"] for r in tls12["cryptoRefArray"]) == ["ECDH-secp256r1", "X25519"]
    provides = {d["ref"]: d.get("provides") for d in doc["dependencies"]}
    # libssl's own TLS 1.2 handshake did not show its key: it provides RSA, by family
    assert provides["crypto/library/libssl@3.0.19"] == sorted(
        ["crypto/protocol/tls@1.3", *suite["algorithms"], pp["cryptoRefArray"][0], "crypto/protocol/tls@1.2",
         "crypto/algorithm/aes-128-gcm@2.16.840.1.101.3.4.1.6", "crypto/algorithm/sha-256@2.16.840.1.101.3.4.2.1",
         "crypto/algorithm/ecdh-secp256r1@1.3.132.1.12", "crypto/algorithm/rsa@1.2.840.113549.1.1.1"])
    assert "crypto/protocol/tls@1.2" in provides["crypto/library/go-static@go1.22.10"]
    assert provides["crypto/library/libcrypto@3.0.19"] is None  # the handshake was libssl's


def test_every_certificate_of_a_bundle(cbom):
    _, doc, files = cbom
    found = {c["name"]: c for c in doc["components"]
             if any(o["location"] == files["bundle"] for o in c.get("evidence", {}).get("occurrences", []))}
    assert sorted(found) == ["ca1.cbom.test", "ca2.cbom.test"]
    ca2 = found["ca2.cbom.test"]
    key = comp(doc, ca2["cryptoProperties"]["certificateProperties"]["subjectPublicKeyRef"])
    assert key["cryptoProperties"]["relatedCryptoMaterialProperties"]["size"] == 3072
    assert comp(doc, key["cryptoProperties"]["relatedCryptoMaterialProperties"]["algorithmRef"])["name"] == "RSA-3072"
    assert sorted(p["value"] for p in ca2["properties"] if p["name"] == "crypto-tracer:flag") == \
        ["expiring_soon", "not_quantum_safe"]


def test_bundle_without_details(files):
    """A document made without bundles in full (snapshot's own JSON) still says how many there are."""
    doc = inventory(files)
    for f in doc["processes"][1]["open_crypto_files"]:
        f.pop("certificates", None)
    built = json.loads(cyclonedx.build(doc))
    [first] = [c for c in built["components"] if c["name"] == "ca1.cbom.test"]
    assert {"name": "crypto-tracer:bundle_certificates", "value": "2"} in first["properties"]
    assert not [c for c in built["components"] if c["name"] == "ca2.cbom.test"]


def test_ssl3_and_unknown_versions(cbom):
    _, doc, _ = cbom
    ssl3 = comp(doc, "crypto/protocol/ssl@3.0")
    assert ssl3["name"] == "SSLv3"
    pp = ssl3["cryptoProperties"]["protocolProperties"]
    assert pp["type"] == "other" and pp["version"] == "3.0"
    assert pp["cipherSuites"][0]["name"] == "TLS_RSA_WITH_AES_128_CBC_SHA"
    assert pp["cipherSuites"][0]["identifiers"] == ["0x00", "0x2F"]
    unknown = comp(doc, "crypto/protocol/tls")  # a handshake whose version the library did not say
    assert unknown["name"] == "TLS" and unknown["cryptoProperties"]["protocolProperties"] == {"type": "tls"}


def test_deterministic(files, tmp_path):
    """The same inventory gives the same document, also in another interpreter (other hash seed)."""
    text = cyclonedx.build(inventory(files), HANDSHAKES)
    assert text == cyclonedx.build(inventory(files), HANDSHAKES)
    src = tmp_path / "inputs.json"
    src.write_text(json.dumps([inventory(files), HANDSHAKES]))
    code = ("import json, sys; from crypto_tracer.sinks import cyclonedx; doc, hs = json.load(open(sys.argv[1])); "
            "sys.stdout.write(cyclonedx.build(doc, hs))")
    for seed in ("1", "2"):
        res = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        assert res.stdout == text


def test_invalid_document_is_an_error():
    bad = json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1,
                      "components": [{"type": "cryptographic-asset", "name": "x",
                                      "cryptoProperties": {"assetType": "no-such-type"}}]})
    with pytest.raises(TracerError) as err:
        cyclonedx.validate(bad)
    assert "does not validate against the CycloneDX 1.6 schema" in str(err.value)


@pytest.mark.parametrize("text, name, ids, parts", [
    ("TLS_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256", ["0x13", "0x03"],
     (None, None, "ChaCha20-Poly1305", "SHA-256")),
    ("0xc030", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", ["0xC0", "0x30"], ("ECDHE", "RSA", "AES-256-GCM", "SHA-384")),
    ("AES128-SHA", "TLS_RSA_WITH_AES_128_CBC_SHA", ["0x00", "0x2F"], ("RSA", None, "AES-128-CBC", "SHA-1")),
    ("0xfafa", "0xfafa", ["0xFA", "0xFA"], (None, None, None, None)),
])
def test_cipher_suites(text, name, ids, parts):
    suite = algs.cipher_suite(text)
    assert (suite.name, suite.identifiers) == (name, ids)
    assert (suite.kx, suite.auth, suite.cipher and suite.cipher.name, suite.hash and suite.hash.name) == parts


def test_groups_and_keys():
    assert algs.group_algorithm("secp384r1").classical == 192
    assert algs.group_algorithm("ffdhe2048").name == "FFDHE-2048"
    assert algs.group_algorithm("MLKEM1024").quantum == 5
    assert algs.key_algorithm("RSA", 4096).classical == 128
    assert algs.key_algorithm("ML-DSA-65", None).quantum == 3
    assert algs.key_algorithm("SLH-DSA-SHA2-128s", None).parameter_set == "128s"
    assert algs.tls_version("TLSv1") == "1.0" and algs.tls_version("SSLv3") is None


def test_read_handshakes(tmp_path):
    lines = tmp_path / "events.json"
    lines.write_text("\n".join(json.dumps(e) for e in HANDSHAKES) + "\n")
    assert snapshot.read_handshakes(str(lines)) == HANDSHAKES[:-1]
    array = tmp_path / "events-array.json"
    array.write_text(json.dumps(HANDSHAKES))
    assert snapshot.read_handshakes(str(array)) == HANDSHAKES[:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(HANDSHAKES[0]) + "\nnot json\n")
    with pytest.raises(TracerError, match="line 2 is not a JSON event"):
        snapshot.read_handshakes(str(bad))


@pytest.mark.parametrize("args, message", [
    (["--observe", "3"], "--observe: only with -f cyclonedx"),
    (["-f", "cyclonedx", "--handshakes", "/nonexistent/hs.json"], "--handshakes /nonexistent/hs.json: no such file"),
    (["-f", "cyclonedx", "--observe", "0"], "must be greater than 0"),
])
def test_cli_errors(args, message):
    res = subprocess.run([sys.executable, "-m", "crypto_tracer", "snapshot", *args], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


def test_suite_table_agrees_with_openssl():
    """Code points and OpenSSL names of the suite table, checked against `openssl ciphers -V -stdname`
    (OpenSSL 3 builds no 3DES and lists no TLS 1.3 CCM suites by default: those four are not checked)."""
    out = subprocess.run(["openssl", "ciphers", "-V", "-stdname", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"],
                         capture_output=True, text=True, check=True).stdout
    listed = {}  # IANA name -> (code point, OpenSSL name)
    for line in out.splitlines():
        code, _, iana, _, openssl_name = line.split()[:5]
        listed[iana] = (tuple(int(b, 16) for b in code.split(",")), openssl_name)
    unchecked = {"TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256", "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
                 "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA"}
    assert set(algs.SUITE_CODES) - set(listed) <= unchecked
    for name, code in algs.SUITE_CODES.items():
        if name in listed:
            assert listed[name][0] == code, name
            assert algs.cipher_suite(listed[name][1]).name == name  # OpenSSL's name for it maps back
