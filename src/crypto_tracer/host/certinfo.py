"""Certificate and key insight: what a certificate or key file is, and what is wrong with it.

``describe(path, file_type)`` parses a certificate, private key or public key file and
returns its properties (never any key material) with a list of ``flags``:

- ``expired`` / ``expiring_soon`` (within 30 days),
- ``weak_rsa_key`` (RSA below 2048 bits), ``weak_dsa_key``,
- ``sha1_signature`` / ``md5_signature``,
- ``not_quantum_safe`` (RSA, EC, DSA, Ed25519/Ed448, DH: all broken by a quantum computer;
  ML-DSA and SLH-DSA, recognised by their OIDs, are quantum-safe).

Results are cached by (device, inode, mtime), so a trust store held open by a hundred
processes is parsed once. ``cryptography`` is imported only when a file is parsed.
"""

from __future__ import annotations

import os
import stat
import warnings
from datetime import datetime, timezone

EXPIRY_WARNING_DAYS = 30
MIN_RSA_BITS = 2048
MAX_FILE_BYTES = 4 << 20  # larger "certificates" are not parsed
MAX_BUNDLE_DETAILS = 1  # a bundle reports its first certificate in full and counts its flags

# NIST PQC signature algorithm OIDs (FIPS 204 ML-DSA, FIPS 205 SLH-DSA): 2.16.840.1.101.3.4.3.17..31
_PQC_SIG_OIDS = {f"2.16.840.1.101.3.4.3.{n}": name for n, name in (
    (17, "ML-DSA-44"), (18, "ML-DSA-65"), (19, "ML-DSA-87"),
    (20, "SLH-DSA-SHA2-128s"), (21, "SLH-DSA-SHA2-128f"), (22, "SLH-DSA-SHA2-192s"),
    (23, "SLH-DSA-SHA2-192f"), (24, "SLH-DSA-SHA2-256s"), (25, "SLH-DSA-SHA2-256f"),
    (26, "SLH-DSA-SHAKE-128s"), (27, "SLH-DSA-SHAKE-128f"), (28, "SLH-DSA-SHAKE-192s"),
    (29, "SLH-DSA-SHAKE-192f"), (30, "SLH-DSA-SHAKE-256s"), (31, "SLH-DSA-SHAKE-256f"))}
_PQC_KEM_OIDS = {"2.16.840.1.101.3.4.4.1": "ML-KEM-512", "2.16.840.1.101.3.4.4.2": "ML-KEM-768",
                 "2.16.840.1.101.3.4.4.3": "ML-KEM-1024"}
_PQC_OIDS = {**_PQC_SIG_OIDS, **_PQC_KEM_OIDS}

_cache: dict[tuple, dict | None] = {}


def describe(path: str, file_type: str | None) -> dict | None:
    """Insight for a certificate / private_key / public_key file, or None (other types, unreadable)."""
    if file_type not in ("certificate", "private_key", "public_key"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, file_type)
    if key not in _cache:
        _cache[key] = _parse(path, file_type, st.st_size)
    return _cache[key]


def certificates(path: str) -> list[dict]:
    """Every certificate of a certificate file in full (describe() gives the first and counts the
    rest of a bundle), each with ``public_key_sha256`` (of its SubjectPublicKeyInfo), for the CBOM;
    [] when unreadable or not certificates. Cached like describe."""
    def parse(data: bytes) -> list[dict]:
        now = datetime.now(timezone.utc)
        return [dict(_one_certificate(cert, now), public_key_sha256=_spki_sha256(cert.public_key))
                for cert in _load_certificates(data)]

    return _cached_read(path, "certificates", parse) or []


def public_key_sha256(path: str, file_type: str) -> str | None:
    """SHA-256 of the SubjectPublicKeyInfo of a private or public key file (not key material: it
    names the public key, so a key file and the certificate of its key can be matched); None for
    encrypted or unparsable keys."""
    from cryptography.hazmat.primitives import serialization

    def parse(data: bytes) -> str | None:
        if file_type == "private_key":
            if b"ENCRYPTED" in data:
                return None
            if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
                key = serialization.load_ssh_private_key(data, password=None)
            elif b"-----BEGIN" in data:
                key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
            else:
                key = serialization.load_der_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
            return _spki_sha256(key.public_key)
        if data.startswith((b"ssh-", b"ecdsa-")):
            key = serialization.load_ssh_public_key(data.split(b"\n", 1)[0])
        elif b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
        return _spki_sha256(lambda: key)

    if file_type not in ("private_key", "public_key"):
        return None
    return _cached_read(path, f"spki:{file_type}", parse)


def _spki_sha256(public_key) -> str | None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    try:
        der = public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # a key type this cryptography cannot serialise
        return None
    return hashlib.sha256(der).hexdigest()


def _cached_read(path: str, kind: str, parse):
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, kind)
    if key not in _cache:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _cache[key] = parse(data)
        except Exception:  # unreadable or malformed: describe() says which
            _cache[key] = None
    return _cache[key]


def _parse(path: str, file_type: str, size: int) -> dict | None:
    if size > MAX_FILE_BYTES:
        return {"error": "too large to parse"}
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES)
    except OSError as exc:
        return {"error": f"unreadable: {exc.strerror}"}
    try:
        if file_type == "certificate":
            return certificate_info(data)
        if file_type == "private_key":
            return private_key_info(data)
        return public_key_info(data)
    except Exception as exc:  # a malformed file is reported, never fatal
        return {"error": f"cannot parse: {type(exc).__name__}"}


# --- certificates ----------------------------------------------------------------------------

def _load_certificates(data: bytes) -> list:
    from cryptography import x509

    with warnings.catch_warnings():  # e.g. trust-store certificates with negative serials
        warnings.simplefilter("ignore")
        if b"-----BEGIN" in data:
            try:
                return x509.load_pem_x509_certificates(data)
            except ValueError:
                return []
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            return []


def certificate_info(data: bytes, now: datetime | None = None) -> dict | None:
    """The first certificate in full; for a bundle, how many there are and their flags."""
    certs = _load_certificates(data)
    if not certs:
        return None
    now = now or datetime.now(timezone.utc)
    info = _one_certificate(certs[0], now)
    if len(certs) > 1:
        counts: dict[str, int] = {}
        for cert in certs:
            for flag in _one_certificate(cert, now)["flags"]:
                counts[flag] = counts.get(flag, 0) + 1
        info["bundle"] = {"certificates": len(certs), "flags": dict(sorted(counts.items()))}
    return info


def _one_certificate(cert, now: datetime) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _certificate_fields(cert, now)


def _certificate_fields(cert, now: datetime) -> dict:
    not_before, not_after = _validity(cert)
    days_left = int((not_after - now).total_seconds() // 86400)
    key = _public_key_summary(cert)
    sig_name, sig_hash = _signature(cert)
    info = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": _iso(not_before),
        "not_after": _iso(not_after),
        "days_left": days_left,
        "key_algorithm": key["algorithm"],
        "key_size": key["key_size"],
        "curve": key.get("curve"),
        "signature_algorithm": sig_name,
        "self_signed": _self_signed(cert),
        "quantum_safe": key["quantum_safe"],
    }
    flags = []
    if now > not_after:
        flags.append("expired")
    elif days_left < EXPIRY_WARNING_DAYS:
        flags.append("expiring_soon")
    if now < not_before:
        flags.append("not_yet_valid")
    flags += key["flags"]
    if sig_hash in ("sha1", "md5"):
        flags.append(f"{sig_hash}_signature")
    info["flags"] = flags
    return info


def _validity(cert) -> tuple[datetime, datetime]:
    if hasattr(cert, "not_valid_after_utc"):  # cryptography >= 42
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    return (cert.not_valid_before.replace(tzinfo=timezone.utc), cert.not_valid_after.replace(tzinfo=timezone.utc))


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _signature(cert) -> tuple[str, str | None]:
    oid = cert.signature_algorithm_oid
    name = getattr(oid, "_name", None) or oid.dotted_string
    if oid.dotted_string in _PQC_SIG_OIDS:
        return _PQC_SIG_OIDS[oid.dotted_string], None
    try:
        h = cert.signature_hash_algorithm
    except Exception:  # unsupported algorithm
        h = None
    return name, h.name if h is not None else None


def _self_signed(cert) -> bool:
    if cert.subject != cert.issuer:
        return False
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(cert)
        return True
    except InvalidSignature:
        return False
    except Exception:  # e.g. SHA-1, which cryptography will not verify: the names decide
        return True


def _public_key_summary(cert) -> dict:
    try:
        return key_summary(cert.public_key())
    except Exception:  # e.g. an ML-DSA key this cryptography cannot load: go by OID
        oid = getattr(cert, "public_key_algorithm_oid", None)
        dotted = oid.dotted_string if oid is not None else None
        name = _PQC_OIDS.get(dotted)
        return {"algorithm": name or dotted, "key_size": None, "quantum_safe": bool(name) if dotted else None,
                "flags": [] if name else (["not_quantum_safe"] if dotted else [])}


# --- keys ------------------------------------------------------------------------------------

def key_summary(key) -> dict:
    """Algorithm, size and flags of a public or private key object (no key material)."""
    from cryptography.hazmat.primitives.asymmetric import dh, dsa, ec, ed448, ed25519, rsa, x448, x25519

    curve = None
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        algorithm, size = "RSA", key.key_size
    elif isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        algorithm, size, curve = "EC", key.key_size, key.curve.name
    elif isinstance(key, (dsa.DSAPublicKey, dsa.DSAPrivateKey)):
        algorithm, size = "DSA", key.key_size
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey)):
        algorithm, size = "Ed25519", 256
    elif isinstance(key, (ed448.Ed448PublicKey, ed448.Ed448PrivateKey)):
        algorithm, size = "Ed448", 456
    elif isinstance(key, (x25519.X25519PublicKey, x25519.X25519PrivateKey)):
        algorithm, size = "X25519", 256
    elif isinstance(key, (x448.X448PublicKey, x448.X448PrivateKey)):
        algorithm, size = "X448", 448
    elif isinstance(key, (dh.DHPublicKey, dh.DHPrivateKey)):
        algorithm, size = "DH", key.key_size
    else:
        algorithm, size = type(key).__name__, None
    pqc = algorithm.startswith(("ML-", "SLH-"))
    flags = []
    if algorithm == "RSA" and size < MIN_RSA_BITS:
        flags.append("weak_rsa_key")
    if algorithm == "DSA":
        flags.append("weak_dsa_key")  # DSA is withdrawn (FIPS 186-5)
    if not pqc:
        flags.append("not_quantum_safe")
    out = {"algorithm": algorithm, "key_size": size, "quantum_safe": pqc, "flags": flags}
    if curve:
        out["curve"] = curve
    return out


_LEGACY_PEM_ALGORITHMS = {b"RSA": "RSA", b"EC": "EC", b"DSA": "DSA"}


def private_key_info(data: bytes) -> dict | None:
    """Algorithm, size and whether the key is encrypted. Encrypted keys are not decrypted:
    their algorithm is known only for the legacy 'BEGIN RSA/EC/DSA PRIVATE KEY' form."""
    from cryptography.hazmat.primitives import serialization

    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        return {"algorithm": None, "key_size": None, "encrypted": True, "quantum_safe": None, "flags": []}
    for label, algorithm in _LEGACY_PEM_ALGORITHMS.items():
        if b"-----BEGIN " + label + b" PRIVATE KEY-----" in data and b"Proc-Type: 4,ENCRYPTED" in data:
            return {"algorithm": algorithm, "key_size": None, "encrypted": True, "quantum_safe": False,
                    "flags": ["not_quantum_safe"]}
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        elif b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
        else:
            key = serialization.load_der_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:  # "password was not given but private key is encrypted"
        return {"algorithm": None, "key_size": None, "encrypted": True, "quantum_safe": None, "flags": []}
    except Exception:
        return None
    info = key_summary(key)
    return {"algorithm": info["algorithm"], "key_size": info["key_size"], **({"curve": info["curve"]}
            if "curve" in info else {}), "encrypted": False, "quantum_safe": info["quantum_safe"],
            "flags": info["flags"]}


def public_key_info(data: bytes) -> dict | None:
    from cryptography.hazmat.primitives import serialization

    try:
        if data.startswith((b"ssh-", b"ecdsa-")):
            key = serialization.load_ssh_public_key(data.split(b"\n", 1)[0])
        elif b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except Exception:
        return None
    return key_summary(key)
