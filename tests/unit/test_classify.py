import os

import pytest

from crypto_tracer.host import classify, elf, proc
from crypto_tracer.probes.monitor import fnv1a


@pytest.mark.parametrize("path,ftype", [
    ("/etc/ssl/certs/server.crt", "certificate"),
    ("/x/CERT.CER", "certificate"),
    ("/x/cert.der", "certificate"),
    ("/x/chain.p7b", "certificate"),
    ("/x/chain.p7c", "certificate"),
    ("/etc/ssl/private/server.key", "private_key"),
    ("/x/KEY.KEY", "private_key"),
    ("/x/k.p8", "private_key"),
    ("/x/k.pk8", "private_key"),
    ("/x/k.pub", "public_key"),
    ("/x/store.p12", "keystore"),
    ("/x/store.pfx", "keystore"),
    ("/x/store.jks", "keystore"),
    ("/x/app.keystore", "keystore"),
    ("/x/android.bks", "keystore"),
    ("/x/req.csr", "csr"),
    ("/x/revoked.crl", "crl"),
    ("/root/.ssh/id_rsa", "private_key"),
    ("/home/a/.ssh/id_ed25519", "private_key"),
    ("/home/a/.ssh/id_ed25519.pub", "public_key"),
    ("/etc/ssh/ssh_host_ecdsa_key", "private_key"),
    ("/etc/ssl/certs/a94d09e5.0", "certificate"),
    ("/etc/ssl/certs/a94d09e5.r1", "crl"),
    ("/usr/share/ca-certificates/mozilla/x.crt", "certificate"),
    ("relative/dir/k.key", "private_key"),
    ("/tmp/a94d09e5.0", None),  # a hash-link name outside a trust store is nothing
    ("/x/notes.txt", None),
    ("/x/README", None),
    ("/x/id_rsa_backup.txt", None),
])
def test_type_from_name(path, ftype):
    assert classify.type_from_name(path) == ftype


@pytest.mark.parametrize("content,ftype", [
    (b"-----BEGIN CERTIFICATE-----\nMII...", "certificate"),
    (b"junk\n-----BEGIN PRIVATE KEY-----\n", "private_key"),
    (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN RSA PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN EC PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN OPENSSH PRIVATE KEY-----", "private_key"),
    (b"-----BEGIN PUBLIC KEY-----", "public_key"),
    (b"-----BEGIN CERTIFICATE REQUEST-----", "csr"),
    (b"-----BEGIN X509 CRL-----", "crl"),
    (b"-----BEGIN PRIVATE KEY-----\n...\n-----BEGIN CERTIFICATE-----", "private_key"),  # first wins
    (b"", None),
    (b"hello", None),
])
def test_pem_by_content(tmp_path, content, ftype):
    p = tmp_path / "x.pem"
    p.write_bytes(content)
    assert classify.pem_type(content) == ftype
    assert classify.file_type(str(p)) == (ftype or "pem")


def test_a_fifo_named_pem_is_not_read(tmp_path):
    fifo = tmp_path / "trap.pem"
    os.mkfifo(fifo)
    assert classify.file_type(str(fifo)) == "pem"  # returns at once instead of blocking


def test_unreadable_pem_is_not_guessed(tmp_path):
    assert classify.file_type(str(tmp_path / "missing.pem")) == "pem"


@pytest.mark.parametrize("path,name", [
    ("/usr/lib/libssl.so.1.1", "libssl"),
    ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "libssl"),
    ("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", "libcrypto"),
    ("libsodium.so.23", "libsodium"),
    ("/usr/lib/libnss3.so", "libnss3"),
    ("/usr/lib/x86_64-linux-gnu/libgnutls.so.30.34.3", "libgnutls"),
    ("/usr/lib/libmbedtls.so.14", "libmbedtls"),
    ("/usr/lib/libwolfssl.so.35", "libwolfssl"),
    ("/usr/lib/libnettle.so.8", "libnettle"),
    ("/usr/lib/libgcrypt.so.20", "libgcrypt"),
    ("/usr/lib/libssl3.so", "libssl3"),
    ("/usr/lib/libcrypto-3.so", "libcrypto"),
    # a wheel's bundled copies, renamed by auditwheel with a hash
    ("/venv/site-packages/pycurl.libs/libssl-8b66dd34.so.3", "libssl"),
    ("/venv/site-packages/psycopg_binary.libs/libcrypto-a1b2c3d4.so.3", "libcrypto"),
    ("/venv/site-packages/pycurl.libs/libcurl-330bcbb6.so.4.8.0", None),
    ("/usr/lib/x86_64-linux-gnu/libgnutls-openssl.so.27", None),
    ("/lib/x86_64-linux-gnu/libcrypt.so.1", None),  # password hashing, not a crypto library
    ("/lib/x86_64-linux-gnu/libc.so.6", None),
    ("/usr/lib/libssl.a", None),
])
def test_library_name(path, name):
    assert classify.library_name(path) == name


def test_wheel_libssl_version_comes_from_the_libcrypto_it_needs():
    """pycurl's libssl-8b66dd34.so.3 has no banner; its libcrypto has another hash: found by DT_NEEDED."""
    import glob

    import pycurl  # the test extra's wheel: OpenSSL 3.6.5

    libssl = glob.glob(os.path.join(os.path.dirname(os.path.dirname(pycurl.__file__)), "pycurl.libs", "libssl-*.so*"))
    assert len(libssl) == 1, libssl
    with elf.ElfFile.open(libssl[0]) as f:
        needed = [n for n in f.needed if n.startswith("libcrypto-")]
    assert len(needed) == 1 and needed[0] not in libssl[0]
    assert classify.library_version(libssl[0]) == pycurl.version.split("OpenSSL/")[1].split()[0] == "3.6.5"
    maps = f"7f00-7f10 r-xp 00003000 fe:00 53 {libssl[0]}\n".encode()
    assert list(proc.mapped_libraries(maps)) == [(libssl[0], False)]


def test_openssl_version_is_read_from_the_file():
    lib = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
    if not os.path.exists(lib):
        pytest.skip("needs the system libcrypto.so.3 (libssl3)")
    import subprocess

    expected = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.split()[1]
    assert classify.library_version(lib) == expected
    # libssl carries no banner of its own: its libcrypto's is used
    assert classify.library_version(lib.replace("libcrypto", "libssl")) == expected


def test_kernel_tables_match_python_tables():
    """The kernel gets hashes of exactly these tables; the hash is the same as in monitor.bpf.c."""
    # FNV-1a 64 test vectors
    assert fnv1a(b"") == 0xCBF29CE484222325
    assert fnv1a(b"a") == 0xAF63DC4C8601EC8C
    src = open(os.path.join(os.path.dirname(classify.__file__), "..", "bpf", "monitor.bpf.c")).read()
    assert "#define FNV_INIT 0xcbf29ce484222325ULL" in src and "#define FNV_PRIME 0x100000001b3ULL" in src
    assert len(classify.TRUST_STORE_DIRS) <= 8
    assert all(len(d) <= 40 for d in classify.TRUST_STORE_DIRS)
