"""What crypto-tracer knows about the algorithms it names: primitive, parameter set, curve, mode,
OID and security levels, for the CycloneDX CBOM (sinks/cyclonedx.py). No imports beyond the stdlib.

Security levels: ``classical`` is the classical strength in bits (NIST SP 800-57 Part 1 Table 2 for
RSA/DH/EC, rounded down to its levels; hashes by collision resistance); ``quantum`` is the NIST PQC
category (1-5) the algorithm meets, 0 when it meets none (everything broken by Shor's algorithm).
Unknown stays None: a signature algorithm's classical strength depends on the signer's key, which
the certificate does not carry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    primitive: str  # a CycloneDX 1.6 cryptoPropertiesType primitive
    oid: str | None = None
    parameter_set: str | None = None
    curve: str | None = None
    mode: str | None = None
    classical: int | None = None
    quantum: int | None = None
    functions: tuple[str, ...] = ()


def _rsa_like_level(bits: int | None) -> int | None:
    """SP 800-57 comparable strength of an RSA/DSA/DH modulus, rounded down to its levels."""
    if not bits:
        return None
    for size, level in ((15360, 256), (7680, 192), (3072, 128), (2048, 112), (1024, 80)):
        if bits >= size:
            return level
    return None  # below 1024 bits: no meaningful strength


# curve name (as `cryptography` and OpenSSL say it) -> classical strength
_CURVE_LEVELS = {"secp192r1": 96, "secp224r1": 112, "secp256r1": 128, "secp384r1": 192, "secp521r1": 256,
                 "secp256k1": 128, "brainpoolP256r1": 128, "brainpoolP384r1": 192, "brainpoolP512r1": 256,
                 "sect233r1": 112, "sect283r1": 128, "sect409r1": 192, "sect571r1": 256,
                 "sect233k1": 112, "sect283k1": 128, "sect409k1": 192, "sect571k1": 256}
_CURVE_ALIASES = {"prime256v1": "secp256r1", "prime192v1": "secp192r1", "p-256": "secp256r1", "p-384": "secp384r1",
                  "p-521": "secp521r1"}

# NIST PQC: name -> (primitive, parameter set, category, OID)
_PQC = {
    "ML-DSA-44": ("signature", "44", 2, "2.16.840.1.101.3.4.3.17"),
    "ML-DSA-65": ("signature", "65", 3, "2.16.840.1.101.3.4.3.18"),
    "ML-DSA-87": ("signature", "87", 5, "2.16.840.1.101.3.4.3.19"),
    "ML-KEM-512": ("kem", "512", 1, "2.16.840.1.101.3.4.4.1"),
    "ML-KEM-768": ("kem", "768", 3, "2.16.840.1.101.3.4.4.2"),
    "ML-KEM-1024": ("kem", "1024", 5, "2.16.840.1.101.3.4.4.3"),
}
_PQC_CLASSICAL = {1: 128, 2: 128, 3: 192, 4: 192, 5: 256}


def _slh_dsa(name: str) -> Algorithm | None:
    m = re.fullmatch(r"SLH-DSA-(SHA2|SHAKE)-(128|192|256)([sf])", name)
    if not m:
        return None
    category = {"128": 1, "192": 3, "256": 5}[m.group(2)]
    return Algorithm(name, "signature", None, m.group(2) + m.group(3), classical=int(m.group(2)), quantum=category,
                     functions=("sign", "verify"))


def curve_name(curve: str | None) -> str | None:
    if curve is None:
        return None
    return _CURVE_ALIASES.get(curve.lower(), curve)


def key_algorithm(algorithm: str | None, size: int | None, curve: str | None = None) -> Algorithm | None:
    """The algorithm of a public or private key as certinfo describes it (algorithm, key_size, curve)."""
    if not algorithm:
        return None
    curve = curve_name(curve)
    if algorithm == "RSA":
        return Algorithm(f"RSA-{size}" if size else "RSA", "pke", "1.2.840.113549.1.1.1",
                         str(size) if size else None, classical=_rsa_like_level(size), quantum=0)
    if algorithm == "EC":
        return Algorithm(f"EC-{curve}" if curve else "EC", "signature", "1.2.840.10045.2.1", None, curve,
                         classical=_CURVE_LEVELS.get(curve), quantum=0, functions=("sign", "verify"))
    if algorithm == "DSA":
        return Algorithm(f"DSA-{size}" if size else "DSA", "signature", "1.2.840.10040.4.1",
                         str(size) if size else None, classical=_rsa_like_level(size), quantum=0,
                         functions=("sign", "verify"))
    if algorithm == "DH":
        return Algorithm(f"DH-{size}" if size else "DH", "key-agree", "1.2.840.113549.1.3.1",
                         str(size) if size else None, classical=_rsa_like_level(size), quantum=0)
    fixed = {"Ed25519": ("signature", "1.3.101.112", "Curve25519", 128, ("sign", "verify")),
             "Ed448": ("signature", "1.3.101.113", "Curve448", 224, ("sign", "verify")),
             "X25519": ("key-agree", "1.3.101.110", "Curve25519", 128, ()),
             "X448": ("key-agree", "1.3.101.111", "Curve448", 224, ())}
    if algorithm in fixed:
        primitive, oid, crv, level, functions = fixed[algorithm]
        return Algorithm(algorithm, primitive, oid, None, crv, classical=level, quantum=0, functions=functions)
    if algorithm in _PQC:
        primitive, pset, category, oid = _PQC[algorithm]
        return Algorithm(algorithm, primitive, oid, pset, classical=_PQC_CLASSICAL[category], quantum=category)
    slh = _slh_dsa(algorithm)
    if slh:
        return slh
    if re.fullmatch(r"[0-9]+(\.[0-9]+)+", algorithm):  # an OID cryptography could not name
        return Algorithm(f"OID-{algorithm}", "unknown", algorithm)
    return Algorithm(algorithm, "unknown")


# X.509 signature algorithms: cryptography's OID name -> (CBOM name, OID, digest)
_SIGNATURES = {
    "md5WithRSAEncryption": ("MD5withRSA", "1.2.840.113549.1.1.4"),
    "sha1WithRSAEncryption": ("SHA1withRSA", "1.2.840.113549.1.1.5"),
    "sha224WithRSAEncryption": ("SHA224withRSA", "1.2.840.113549.1.1.14"),
    "sha256WithRSAEncryption": ("SHA256withRSA", "1.2.840.113549.1.1.11"),
    "sha384WithRSAEncryption": ("SHA384withRSA", "1.2.840.113549.1.1.12"),
    "sha512WithRSAEncryption": ("SHA512withRSA", "1.2.840.113549.1.1.13"),
    "RSASSA-PSS": ("RSASSA-PSS", "1.2.840.113549.1.1.10"),
    "ecdsa-with-SHA1": ("SHA1withECDSA", "1.2.840.10045.4.1"),
    "ecdsa-with-SHA224": ("SHA224withECDSA", "1.2.840.10045.4.3.1"),
    "ecdsa-with-SHA256": ("SHA256withECDSA", "1.2.840.10045.4.3.2"),
    "ecdsa-with-SHA384": ("SHA384withECDSA", "1.2.840.10045.4.3.3"),
    "ecdsa-with-SHA512": ("SHA512withECDSA", "1.2.840.10045.4.3.4"),
    "dsa-with-sha1": ("SHA1withDSA", "1.2.840.10040.4.3"),
    "dsa-with-sha224": ("SHA224withDSA", "2.16.840.1.101.3.4.3.1"),
    "dsa-with-sha256": ("SHA256withDSA", "2.16.840.1.101.3.4.3.2"),
    "ed25519": ("Ed25519", "1.3.101.112"),
    "ed448": ("Ed448", "1.3.101.113"),
}


def signature_algorithm(name: str | None) -> Algorithm | None:
    """A certificate's signature algorithm as certinfo names it (cryptography's OID name, a PQC name
    or a dotted OID)."""
    if not name:
        return None
    if name in _SIGNATURES:
        cbom_name, oid = _SIGNATURES[name]
        return Algorithm(cbom_name, "signature", oid, quantum=0, functions=("sign", "verify"))
    pqc = key_algorithm(name, None)
    if pqc is not None and pqc.primitive == "signature" and pqc.quantum:
        return pqc
    if re.fullmatch(r"[0-9]+(\.[0-9]+)+", name):
        return Algorithm(f"OID-{name}", "signature", name, functions=("sign", "verify"))
    return Algorithm(name, "signature", functions=("sign", "verify"))


# --- TLS -------------------------------------------------------------------------------------

# IANA TLS Supported Groups, by the names pipeline/hello_facts.py (and OpenSSL) give them
def group_algorithm(group: str | None) -> Algorithm | None:
    if not group:
        return None
    g = group.lower()
    if g in ("x25519", "x448"):
        return key_algorithm(g.upper(), None)
    curve = curve_name(g.removesuffix("tls13") if g.startswith("brainpool") else g)
    curve = {"brainpoolp256r1": "brainpoolP256r1", "brainpoolp384r1": "brainpoolP384r1",
             "brainpoolp512r1": "brainpoolP512r1"}.get(curve, curve)
    if curve in _CURVE_LEVELS:
        return Algorithm(f"ECDH-{curve}", "key-agree", "1.3.132.1.12", None, curve, classical=_CURVE_LEVELS[curve],
                         quantum=0, functions=("keygen",))
    m = re.fullmatch(r"ffdhe(\d+)", g)
    if m:
        bits = int(m.group(1))
        return Algorithm(f"FFDHE-{bits}", "key-agree", None, str(bits), classical=_rsa_like_level(bits), quantum=0,
                         functions=("keygen",))
    m = re.fullmatch(r"(?:ml-?kem-?)(512|768|1024)", g)
    if m:
        return key_algorithm(f"ML-KEM-{m.group(1)}", None)
    hybrids = {"x25519mlkem768": ("768", 3, 128, "Curve25519"), "secp256r1mlkem768": ("768", 3, 128, "secp256r1"),
               "secp384r1mlkem1024": ("1024", 5, 192, "secp384r1"),
               "x25519kyber768draft00": ("768", 3, 128, "Curve25519"),
               "secp256r1kyber768draft00": ("768", 3, 128, "secp256r1")}
    if g in hybrids:
        # a hybrid holds while either part holds: classical strength of its ECDH part (kept if ML-KEM
        # falls), quantum category of its ML-KEM part
        pset, category, classical, crv = hybrids[g]
        return Algorithm(group, "kem", None, pset, crv, classical=classical, quantum=category,
                         functions=("encapsulate", "decapsulate"))
    return Algorithm(group, "key-agree" if not g.startswith("0x") else "unknown")


_HASHES = {"SHA": Algorithm("SHA-1", "hash", "1.3.14.3.2.26", "160", quantum=0, functions=("digest",)),
           "MD5": Algorithm("MD5", "hash", "1.2.840.113549.2.5", "128", quantum=0, functions=("digest",)),
           "SHA256": Algorithm("SHA-256", "hash", "2.16.840.1.101.3.4.2.1", "256", classical=128, quantum=2,
                               functions=("digest",)),
           "SHA384": Algorithm("SHA-384", "hash", "2.16.840.1.101.3.4.2.2", "384", classical=192, quantum=4,
                               functions=("digest",)),
           "SHA512": Algorithm("SHA-512", "hash", "2.16.840.1.101.3.4.2.3", "512", classical=256, quantum=5,
                               functions=("digest",))}

_AES_OIDS = {("128", "cbc"): "2.16.840.1.101.3.4.1.2", ("128", "gcm"): "2.16.840.1.101.3.4.1.6",
             ("128", "ccm"): "2.16.840.1.101.3.4.1.7", ("256", "cbc"): "2.16.840.1.101.3.4.1.42",
             ("256", "gcm"): "2.16.840.1.101.3.4.1.46", ("256", "ccm"): "2.16.840.1.101.3.4.1.47"}


def _bulk_cipher(text: str) -> Algorithm | None:
    """The record cipher of an IANA suite name part: AES_128_GCM, CHACHA20_POLY1305, 3DES_EDE_CBC..."""
    m = re.fullmatch(r"AES_(128|256)_(GCM|CCM|CCM_8|CBC)", text)
    if m:
        bits, mode = m.group(1), m.group(2).lower()
        base_mode = mode.removesuffix("_8")
        name = f"AES-{bits}-{mode.upper().replace('_', '-')}"
        return Algorithm(name, "block-cipher" if mode == "cbc" else "ae", _AES_OIDS.get((bits, base_mode)), bits,
                         mode=base_mode, classical=int(bits), quantum=1 if bits == "128" else 5,
                         functions=("encrypt", "decrypt"))
    if text == "CHACHA20_POLY1305":
        return Algorithm("ChaCha20-Poly1305", "ae", "1.2.840.113549.1.9.16.3.18", "256", classical=256, quantum=5,
                         functions=("encrypt", "decrypt"))
    if text == "3DES_EDE_CBC":
        return Algorithm("3DES-CBC", "block-cipher", "1.2.840.113549.3.7", "168", mode="cbc", classical=112,
                         quantum=0, functions=("encrypt", "decrypt"))
    if text in ("RC4_128", "NULL"):
        return Algorithm("RC4-128" if text == "RC4_128" else "NULL", "stream-cipher" if text == "RC4_128" else "other",
                         quantum=0, functions=("encrypt", "decrypt"))
    return None


# IANA code points of the suites hosts meet (TLS Cipher Suites registry), as the registry writes them
SUITE_CODES = {
    "TLS_AES_128_GCM_SHA256": (0x13, 0x01), "TLS_AES_256_GCM_SHA384": (0x13, 0x02),
    "TLS_CHACHA20_POLY1305_SHA256": (0x13, 0x03), "TLS_AES_128_CCM_SHA256": (0x13, 0x04),
    "TLS_AES_128_CCM_8_SHA256": (0x13, 0x05),
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": (0xC0, 0x2B), "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": (0xC0, 0x2C),
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": (0xC0, 0x2F), "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": (0xC0, 0x30),
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": (0xCC, 0xA8),
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": (0xCC, 0xA9),
    "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256": (0xCC, 0xAA),
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256": (0x00, 0x9E), "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384": (0x00, 0x9F),
    "TLS_RSA_WITH_AES_128_GCM_SHA256": (0x00, 0x9C), "TLS_RSA_WITH_AES_256_GCM_SHA384": (0x00, 0x9D),
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": (0xC0, 0x09), "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": (0xC0, 0x0A),
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": (0xC0, 0x13), "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": (0xC0, 0x14),
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": (0xC0, 0x23), "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384": (0xC0, 0x24),
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": (0xC0, 0x27), "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384": (0xC0, 0x28),
    "TLS_RSA_WITH_AES_128_CBC_SHA": (0x00, 0x2F), "TLS_RSA_WITH_AES_256_CBC_SHA": (0x00, 0x35),
    "TLS_RSA_WITH_AES_128_CBC_SHA256": (0x00, 0x3C), "TLS_RSA_WITH_AES_256_CBC_SHA256": (0x00, 0x3D),
    "TLS_DHE_RSA_WITH_AES_128_CBC_SHA": (0x00, 0x33), "TLS_DHE_RSA_WITH_AES_256_CBC_SHA": (0x00, 0x39),
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": (0x00, 0x0A), "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": (0xC0, 0x12),
}
# OpenSSL's own names of the TLS 1.2 suites above (SSL_CIPHER_get_name) -> IANA
_OPENSSL_NAMES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "DHE-RSA-CHACHA20-POLY1305": "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "DHE-RSA-AES128-GCM-SHA256": "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    "DHE-RSA-AES256-GCM-SHA384": "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    "AES128-GCM-SHA256": "TLS_RSA_WITH_AES_128_GCM_SHA256", "AES256-GCM-SHA384": "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-ECDSA-AES128-SHA": "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "ECDHE-ECDSA-AES256-SHA": "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "ECDHE-RSA-AES128-SHA": "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES256-SHA": "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "ECDHE-ECDSA-AES128-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "ECDHE-ECDSA-AES256-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    "ECDHE-RSA-AES128-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    "ECDHE-RSA-AES256-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    "AES128-SHA": "TLS_RSA_WITH_AES_128_CBC_SHA", "AES256-SHA": "TLS_RSA_WITH_AES_256_CBC_SHA",
    "AES128-SHA256": "TLS_RSA_WITH_AES_128_CBC_SHA256", "AES256-SHA256": "TLS_RSA_WITH_AES_256_CBC_SHA256",
    "DHE-RSA-AES128-SHA": "TLS_DHE_RSA_WITH_AES_128_CBC_SHA", "DHE-RSA-AES256-SHA": "TLS_DHE_RSA_WITH_AES_256_CBC_SHA",
    "DES-CBC3-SHA": "TLS_RSA_WITH_3DES_EDE_CBC_SHA", "ECDHE-RSA-DES-CBC3-SHA": "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
}
_CODE_TO_NAME = {code: name for name, code in SUITE_CODES.items()}
_SUITE_RE = re.compile(r"TLS_(?:(?P<kx>ECDHE|DHE|ECDH|DH|RSA|PSK|ECDHE_PSK|DHE_PSK)_(?:(?P<auth>RSA|ECDSA|DSS|PSK)_)?WITH_)?"
                       r"(?P<cipher>.+?)(?:_(?P<hash>SHA|SHA256|SHA384|SHA512|MD5))?")


@dataclass(frozen=True)
class CipherSuite:
    name: str  # IANA name, or what the event said when it is not one we know
    code: tuple[int, int] | None  # IANA code point
    kx: str | None  # ECDHE, DHE, RSA... (TLS 1.2; TLS 1.3 suites name none)
    auth: str | None
    cipher: Algorithm | None
    hash: Algorithm | None

    @property
    def identifiers(self) -> list[str]:
        """As the IANA registry and CycloneDX's examples write a code point: ["0xC0", "0x30"]."""
        return [f"0x{b:02X}" for b in self.code] if self.code else []


def cipher_suite(text: str | None) -> CipherSuite | None:
    """A negotiated suite from a tls_handshake event's cipher: IANA name, OpenSSL name or "0x1301"."""
    if not text:
        return None
    name = _OPENSSL_NAMES.get(text, text)
    if re.fullmatch(r"0x[0-9a-fA-F]{4}", name):
        value = int(name, 16)
        code = (value >> 8, value & 0xFF)
        if code not in _CODE_TO_NAME:
            return CipherSuite(name, code, None, None, None, None)
        name = _CODE_TO_NAME[code]
    m = _SUITE_RE.fullmatch(name)
    if not m:
        return CipherSuite(name, SUITE_CODES.get(name), None, None, None, None)
    hash_name = m.group("hash") or ("SHA256" if m.group("cipher").startswith("AES_128_CCM") else None)
    return CipherSuite(name, SUITE_CODES.get(name), m.group("kx"), m.group("auth"), _bulk_cipher(m.group("cipher")),
                       _HASHES.get(hash_name) if hash_name else None)


def kx_algorithm(kx: str | None) -> Algorithm | None:
    """The TLS 1.2 key exchange when the group is not known (one Algorithm per name: the same
    name from a key, a group or a suite is the same asset)."""
    if kx in ("ECDHE", "ECDH"):
        return Algorithm("ECDH", "key-agree", "1.3.132.1.12", quantum=0, functions=("keygen",))
    if kx in ("DHE", "DH"):
        return key_algorithm("DH", None)
    if kx == "RSA":
        return key_algorithm("RSA", None)
    return None


def auth_algorithm(auth: str | None, key_type: str | None = None, key_bits: int | None = None) -> Algorithm | None:
    """The suite's authentication; the peer's key when the handshake showed it (TLS 1.2)."""
    if key_type:
        known = key_algorithm({"rsa": "RSA", "ec": "EC", "ecdsa": "EC", "ed25519": "Ed25519", "ed448": "Ed448",
                               "dsa": "DSA"}.get(key_type.lower(), key_type), key_bits)
        if known is not None and known.primitive != "unknown":
            return known
    if auth == "RSA":
        return key_algorithm("RSA", None)
    if auth == "ECDSA":
        return Algorithm("ECDSA", "signature", "1.2.840.10045.2.1", quantum=0, functions=("sign", "verify"))
    if auth == "DSS":
        return key_algorithm("DSA", None)
    return None


def tls_version(text: str | None) -> str | None:
    """"TLSv1.3" -> "1.3"; SSLv3 -> None (not a TLS version)."""
    if not text:
        return None
    m = re.fullmatch(r"TLSv?(1(?:\.[0-3])?)", text.strip())
    if not m:
        return None
    return m.group(1) if "." in m.group(1) else "1.0"
