"""An NSS TLS client with ALPN, through ctypes over the system's libssl3/libnss3/libnspr4 (tstclnt
offers no ALPN): connects to 127.0.0.1:PORT with TLS 1.3, offers the ALPN names given, sends a request
through PR_Write, reads the answer through PR_Read, and prints {"alpn": what NSS negotiated,
"answer": its first bytes (latin-1)}.

    python nss_client.py PORT SNI ALPN[,ALPN...]
"""

import ctypes
import json
import socket
import sys
from ctypes import POINTER, byref, c_char_p, c_int, c_uint, c_void_p

AUTH_HOOK = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_int, c_int)
SSL_SECURITY, SSL_HANDSHAKE_AS_CLIENT = 1, 5
TLS13 = 0x0304


class VersionRange(ctypes.Structure):
    _fields_ = [("min", ctypes.c_uint16), ("max", ctypes.c_uint16)]


def main() -> int:
    port, sni, alpns = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].encode().split(b",")
    nspr, nss, ssl = (ctypes.CDLL(n) for n in ("libnspr4.so", "libnss3.so", "libssl3.so"))
    nspr.PR_ImportTCPSocket.restype, nspr.PR_ImportTCPSocket.argtypes = c_void_p, [c_int]
    nspr.PR_Read.argtypes, nspr.PR_Write.argtypes = [c_void_p, c_void_p, c_int], [c_void_p, c_char_p, c_int]
    nspr.PR_Close.argtypes = [c_void_p]
    ssl.SSL_ImportFD.restype, ssl.SSL_ImportFD.argtypes = c_void_p, [c_void_p, c_void_p]
    ssl.SSL_OptionSet.argtypes = [c_void_p, c_int, c_int]
    ssl.SSL_VersionRangeSet.argtypes = [c_void_p, POINTER(VersionRange)]
    ssl.SSL_SetURL.argtypes = [c_void_p, c_char_p]
    ssl.SSL_SetNextProtoNego.argtypes = [c_void_p, c_char_p, c_uint]
    ssl.SSL_AuthCertificateHook.argtypes = [c_void_p, AUTH_HOOK, c_void_p]
    ssl.SSL_ResetHandshake.argtypes = [c_void_p, c_int]
    ssl.SSL_GetNextProto.argtypes = [c_void_p, POINTER(c_int), c_char_p, POINTER(c_uint), c_uint]
    if nss.NSS_NoDB_Init(None):
        raise SystemExit("NSS_NoDB_Init failed")
    accept = AUTH_HOOK(lambda *_: 0)  # the test's certificate is self-signed
    fd = ssl.SSL_ImportFD(None, nspr.PR_ImportTCPSocket(socket.create_connection(("127.0.0.1", port)).detach()))
    offer = b"".join(bytes([len(a)]) + a for a in alpns)
    rng = VersionRange(TLS13, TLS13)
    if (ssl.SSL_OptionSet(fd, SSL_SECURITY, 1) or ssl.SSL_OptionSet(fd, SSL_HANDSHAKE_AS_CLIENT, 1) or
            ssl.SSL_VersionRangeSet(fd, byref(rng)) or ssl.SSL_SetURL(fd, sni) or
            ssl.SSL_SetNextProtoNego(fd, offer, len(offer)) or ssl.SSL_AuthCertificateHook(fd, accept, None) or
            ssl.SSL_ResetHandshake(fd, 0)):
        raise SystemExit("setting up the NSS client failed")
    request = b"GET /nss-alpn HTTP/1.0\r\n\r\n"
    if nspr.PR_Write(fd, request, len(request)) != len(request):  # the handshake runs inside
        raise SystemExit("PR_Write failed")
    buf = ctypes.create_string_buffer(4096)
    n = nspr.PR_Read(fd, buf, len(buf))
    state, proto, plen = c_int(), ctypes.create_string_buffer(256), c_uint()
    ssl.SSL_GetNextProto(fd, byref(state), proto, byref(plen), 255)
    nspr.PR_Close(fd)
    print(json.dumps({"alpn": proto.raw[:plen.value].decode() or None,
                      "answer": buf.raw[:max(n, 0)].decode("latin-1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
