"""The tests' Python HTTPS server (ssl module, so OpenSSL's _ex calls):
python https_server.py PORT CERT KEY [--host H] [--keylog FILE] [--response FILE] [--comm NAME]

GET and POST are answered with the contents of --response, or 'resp-<path>' without it. A standalone
script: it runs with no pytest and no crypto_tracer on the path.
"""

import argparse
import ctypes
import http.server
import signal
import socket
import ssl
import sys


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("cert")
    ap.add_argument("key")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--keylog")
    ap.add_argument("--response")
    ap.add_argument("--comm")
    args = ap.parse_args(argv)
    if args.comm:  # the command name, so that a tracer can watch only the servers
        ctypes.CDLL(None).prctl(15, args.comm.encode())
    response = None
    if args.response:
        with open(args.response, "rb") as f:
            response = f.read()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = response if response is not None else ("resp-" + self.path + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *a):
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        daemon_threads = True

    server = Server((args.host, args.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    if args.keylog:
        ctx.keylog_filename = args.keylog
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
