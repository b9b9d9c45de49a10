"""Certificate and key insight on certificates generated here (no privileges needed)."""

import datetime as dt
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from crypto_tracer.host import certinfo
from tests.harness import cert_pem, make_cert

NOW = dt.datetime.now(dt.timezone.utc)


def make_pem(key, cn, not_after, not_before=None, issuer_key=None, issuer_cn=None):
    return cert_pem(key, cn, not_after, not_before or NOW - dt.timedelta(days=30), issuer_key, issuer_cn or "",
                    serial=0x1234ABCD)


def test_expired_certificate():
    key = ec.generate_private_key(ec.SECP256R1())
    info = certinfo.certificate_info(make_pem(key, "old.test", NOW - dt.timedelta(days=2) + dt.timedelta(hours=1)))
    assert info["subject"] == "CN=old.test"
    assert info["serial"] == "1234abcd"
    assert info["days_left"] == -2
    assert info["key_algorithm"] == "EC" and info["key_size"] == 256 and info["curve"] == "secp256r1"
    assert info["signature_algorithm"] == "ecdsa-with-SHA256"
    assert info["self_signed"] is True
    assert info["flags"] == ["expired", "not_quantum_safe"]


def test_expiring_soon_and_issuer():
    ca = rsa.generate_private_key(65537, 2048)
    key = rsa.generate_private_key(65537, 2048)
    pem = make_pem(key, "leaf.test", NOW + dt.timedelta(days=10, hours=1), issuer_key=ca, issuer_cn="Test CA")
    info = certinfo.certificate_info(pem)
    assert info["days_left"] == 10
    assert info["issuer"] == "CN=Test CA" and info["self_signed"] is False
    assert info["key_algorithm"] == "RSA" and info["key_size"] == 2048
    assert "expiring_soon" in info["flags"] and "weak_rsa_key" not in info["flags"]


def test_weak_rsa_sha1_certificate(tmp_path):
    make_cert(tmp_path, "weak.test", 365, rsa_bits=1024, sha1=True, cert_name="c.pem", key_name="k.pem")
    info = certinfo.describe(str(tmp_path / "c.pem"), "certificate")
    assert info["signature_algorithm"] == "sha1WithRSAEncryption"
    assert info["key_size"] == 1024
    assert info["flags"] == ["weak_rsa_key", "not_quantum_safe", "sha1_signature"]
    key = certinfo.describe(str(tmp_path / "k.pem"), "private_key")
    assert key == {"algorithm": "RSA", "key_size": 1024, "encrypted": False, "quantum_safe": False,
                   "flags": ["weak_rsa_key", "not_quantum_safe"]}


def test_bundle_counts_flags():
    k = ed25519.Ed25519PrivateKey.generate()
    pem = (make_pem(k, "a", NOW + dt.timedelta(days=400)) + make_pem(k, "b", NOW - dt.timedelta(days=3)))
    info = certinfo.certificate_info(pem)
    assert info["subject"] == "CN=a" and info["key_algorithm"] == "Ed25519"
    assert info["bundle"] == {"certificates": 2, "flags": {"expired": 1, "not_quantum_safe": 2}}


def test_private_keys_never_leak_material(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    plain = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"pw"))
    info = certinfo.private_key_info(plain)
    assert info == {"algorithm": "EC", "key_size": 384, "curve": "secp384r1", "encrypted": False,
                    "quantum_safe": False, "flags": ["not_quantum_safe"]}
    assert certinfo.private_key_info(enc)["encrypted"] is True
    secret = format(key.private_numbers().private_value, "x")
    assert secret not in repr(info)


def test_cache_by_inode_and_mtime(tmp_path):
    path = tmp_path / "c.pem"
    path.write_bytes(make_pem(ec.generate_private_key(ec.SECP256R1()), "one", NOW + dt.timedelta(days=90)))
    assert certinfo.describe(str(path), "certificate")["subject"] == "CN=one"
    assert certinfo.describe(str(path), "certificate") is certinfo.describe(str(path), "certificate")
    path.write_bytes(make_pem(ec.generate_private_key(ec.SECP256R1()), "two", NOW + dt.timedelta(days=90)))
    os.utime(path, ns=(1, 10**18))  # a different mtime: parsed again
    assert certinfo.describe(str(path), "certificate")["subject"] == "CN=two"


def test_garbage_is_reported_not_fatal(tmp_path):
    path = tmp_path / "x.crt"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert certinfo.describe(str(path), "certificate") is None
    assert certinfo.describe(str(path), "keystore") is None


@pytest.mark.parametrize("oid,name", [("2.16.840.1.101.3.4.3.18", "ML-DSA-65"), ("2.16.840.1.101.3.4.3.20", "SLH-DSA-SHA2-128s")])
def test_pqc_oids_are_quantum_safe(oid, name):
    assert certinfo._PQC_OIDS[oid] == name
