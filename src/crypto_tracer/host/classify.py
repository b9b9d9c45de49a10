"""What is a crypto file, and what is a crypto library: the classification tables, in one place.

The kernel programs pre-filter with a copy of the suffix and library-name tables
(bpf/monitor.bpf.c); tests/unit/test_classify.py checks that copy against these tables.
"""

from __future__ import annotations

import os
import re
import stat
import struct

from crypto_tracer.host import elf, proc

# file name suffix -> file type (lower-case comparison)
SUFFIX_TYPES: dict[str, str] = {
    ".crt": "certificate",
    ".cer": "certificate",
    ".der": "certificate",
    ".pem": "certificate",  # decided by content, see pem_type()
    ".p7b": "certificate",
    ".p7c": "certificate",
    ".key": "private_key",
    ".p8": "private_key",
    ".pk8": "private_key",
    ".pub": "public_key",
    ".p12": "keystore",
    ".pfx": "keystore",
    ".jks": "keystore",
    ".keystore": "keystore",
    ".bks": "keystore",
    ".csr": "csr",
    ".crl": "crl",
}

# exact base names of key files without a telling suffix: ssh user and host keys
# (their .pub twins are public keys by suffix)
EXACT_NAMES: dict[str, str] = {
    **{f"id_{k}": "private_key" for k in ("rsa", "dsa", "ecdsa", "ed25519", "ecdsa_sk", "ed25519_sk", "xmss")},
    **{f"ssh_host_{k}_key": "private_key" for k in ("rsa", "dsa", "ecdsa", "ed25519")},
}

# Trust stores: whole directories or bundle files of CA certificates.
# (at most 8: the kernel keeps a copy in a fixed-size map)
TRUST_STORE_DIRS = ("/etc/ssl/certs/", "/etc/pki/", "/usr/share/ca-certificates/", "/etc/ca-certificates/",
                    "/usr/local/share/ca-certificates/", "/usr/lib/ssl/certs/")
# c_rehash names in a trust-store directory: 8 hex digits, '.', optional 'r' (a CRL), a digit
HASH_LINK_RE = re.compile(r"^[0-9a-f]{8}\.(r?)[0-9]+$")

PEM_LABELS: tuple[tuple[bytes, str], ...] = (
    (b"-----BEGIN CERTIFICATE-----", "certificate"),
    (b"-----BEGIN TRUSTED CERTIFICATE-----", "certificate"),
    (b"-----BEGIN X509 CERTIFICATE-----", "certificate"),
    (b"-----BEGIN PKCS7-----", "certificate"),
    (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN RSA PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN EC PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN DSA PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN OPENSSH PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN PUBLIC KEY-----", "public_key"),
    (b"-----BEGIN RSA PUBLIC KEY-----", "public_key"),
    (b"-----BEGIN CERTIFICATE REQUEST-----", "csr"),
    (b"-----BEGIN NEW CERTIFICATE REQUEST-----", "csr"),
    (b"-----BEGIN X509 CRL-----", "crl"),
    (b"-----BEGIN DH PARAMETERS-----", "parameters"),
    (b"-----BEGIN EC PARAMETERS-----", "parameters"),
)
PEM_SNIFF_BYTES = 64 * 1024


def type_from_name(path: str) -> str | None:
    """File type from the name alone (no I/O), or None if the path is not a crypto file."""
    base = path.rsplit("/", 1)[-1]
    lower = base.lower()
    dot = lower.rfind(".")
    if dot > 0:
        ftype = SUFFIX_TYPES.get(lower[dot:])
        if ftype:
            return ftype
    ftype = EXACT_NAMES.get(base)
    if ftype:
        return ftype
    if path.startswith("/"):
        if path in ("/etc/ssl/cert.pem", "/etc/pki/tls/cert.pem"):
            return "certificate"
        for d in TRUST_STORE_DIRS:
            if path.startswith(d):
                m = HASH_LINK_RE.match(base)
                if m:
                    return "crl" if m.group(1) else "certificate"
    return None


def pem_type(data: bytes) -> str | None:
    """Type of a PEM file from its content: the first known BEGIN line wins."""
    best, best_pos = None, len(data) + 1
    for marker, ftype in PEM_LABELS:
        pos = data.find(marker)
        if 0 <= pos < best_pos:
            best, best_pos = ftype, pos
    return best


def read_head(path: str, size: int) -> bytes | None:
    """The first bytes of a regular file; None for anything else (a FIFO or device named
    *.pem must never block or be consumed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def sniff_file(path: str) -> str | None:
    """Type of a .pem file by reading its first bytes; None if unreadable or not PEM."""
    head = read_head(path, PEM_SNIFF_BYTES)
    return pem_type(head) if head is not None else None


def file_type(path: str, read_path: str | None = None) -> str | None:
    """Full classification: by name, and .pem files by content (read from read_path if given,
    e.g. through /proc/PID/root for a process in a container)."""
    ftype = type_from_name(path)
    if ftype and path.lower().endswith(".pem"):
        return sniff_file(read_path or path) or "pem"  # unreadable or not PEM: say so, don't guess
    return ftype


# --- libraries -------------------------------------------------------------------------------

# library name (basename before '.so' / '-VERSION.so') -> family
CRYPTO_LIBRARIES: dict[str, str] = {
    "libssl": "openssl",
    "libcrypto": "openssl",
    "libgnutls": "gnutls",
    "libnss3": "nss",
    "libssl3": "nss",
    "libsmime3": "nss",
    "libnspr4": "nss",
    "libsoftokn3": "nss",
    "libfreebl3": "nss",
    "libfreeblpriv3": "nss",
    "libsodium": "libsodium",
    "libmbedtls": "mbedtls",
    "libmbedcrypto": "mbedtls",
    "libmbedx509": "mbedtls",
    "libwolfssl": "wolfssl",
    "libboringssl": "boringssl",
    "libnettle": "nettle",
    "libhogweed": "nettle",
    "libgcrypt": "libgcrypt",
    "libk5crypto": "krb5",
}
_LIB_RE = re.compile("^" + proc.LIBRARY_NAME + r"(?:\.[0-9.]+)?$")


def library_name(path: str) -> str | None:
    """'libssl' for /usr/lib/x86_64-linux-gnu/libssl.so.3; None if not a crypto library."""
    m = _LIB_RE.match(path.rsplit("/", 1)[-1])
    if not m:
        return None
    name = m.group(1)
    return name if name in CRYPTO_LIBRARIES else None


_version_cache: dict[tuple[int, int, int], str | None] = {}


def library_version(path: str, name: str | None = None) -> str | None:
    """Version read from the library file itself, cached by (device, inode, mtime).

    OpenSSL-family libraries carry their banner ("OpenSSL 3.0.19 ..."); libssl's lives in
    its libcrypto. Others (GnuTLS, NSS, libsodium, libgcrypt) carry a bare "x.y.z" string:
    the first one with a major version >= 1 is taken. Unknown stays None.
    """
    name = name or library_name(path)
    if name is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if key in _version_cache:
        return _version_cache[key]
    version = _read_version(path, name)
    if version is None and not os.path.exists(path):
        return None  # gone while read (a /proc/PID/root path whose process exited): nothing learned
    if version is None and name == "libssl":
        sibling = _libcrypto_of(path)
        if sibling is not None:
            version = library_version(sibling, "libcrypto")
        if version is None:
            return None  # the sibling may be unreachable only now (its process exited): don't cache
    _version_cache[key] = version
    return version


def _libcrypto_of(libssl: str) -> str | None:
    """The libcrypto beside a libssl: the one it links against (a wheel's libssl-8b66dd34.so.3
    needs libcrypto-fa202293.so.3), else the same name with libcrypto for libssl."""
    f = elf.open_or_none(libssl)
    if f is not None:
        with f:
            try:
                needed = [n for n in f.needed if library_name(n) == "libcrypto"]
            except (ValueError, struct.error, IndexError, OSError):
                needed = []
        if needed:
            return os.path.join(os.path.dirname(libssl), needed[0])
    sibling = re.sub(r"libssl(\.so)", r"libcrypto\1", libssl)
    return sibling if sibling != libssl else None


def _read_version(path: str, name: str) -> str | None:
    family = CRYPTO_LIBRARIES.get(name)
    if family in ("openssl", "wolfssl", "boringssl"):
        return elf.banner_version(path, openssl_family=True)
    if family in ("gnutls", "nss", "libsodium", "libgcrypt"):
        return elf.banner_version(path, openssl_family=False)
    return None
