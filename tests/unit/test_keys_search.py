"""keys/search.py on real SSL objects (the system libssl driven in-process through ctypes, as the
calibration worker does): the offsets it learns hold in every object, a decoy copy of a secret in one
object is not taken, and verification rejects any layout or key log that does not match exactly."""

import dataclasses
import os

import pytest

from crypto_tracer.keys import calibrate_worker as worker
from crypto_tracer.keys.search import SCAN, SearchError, find_all, learn, verify

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


@pytest.fixture(scope="module")
def objects():
    if not os.path.exists(LIBSSL):
        pytest.skip(f"needs {LIBSSL}")
    ossl = worker.OpenSSL(LIBSSL)
    pairs = [ossl.handshake(*r) for r in worker.ROUNDS for _ in range(2)]
    return worker.samples(ossl, [s for pair in pairs for s in pair])


def _pairs(samples):
    return [(s.ssl, s.lines) for s in samples]


def test_learned_layout_reproduces_every_object(objects):
    lay = learn(worker.read, objects)
    assert verify(worker.read, lay, _pairs(objects)) == len(objects) == 24


def test_session_found_without_the_library_telling(objects):
    """node gives no SSL_get_session: the session pointer is found by the master key it leads to."""
    blind = [dataclasses.replace(s, session=None) for s in objects]
    assert learn(worker.read, blind) == learn(worker.read, objects)


def test_a_decoy_secret_in_one_object_is_not_taken(objects):
    """A copy of the first object's client traffic secret earlier in it (what a stale buffer or a
    neighbouring object looks like) is a candidate there only: the search keeps the offset all agree on."""
    true = learn(worker.read, objects)
    first = next(s for s in objects if s.version == 0x0304)
    secret = first.secret("CLIENT_TRAFFIC_SECRET_0")
    decoy = first.ssl + 0x100

    def read(addr, size):
        data = bytearray(worker.read(addr, size))
        for i in range(len(secret)):
            if 0 <= decoy + i - addr < len(data):
                data[decoy + i - addr] = secret[i]
        return bytes(data)

    assert len(find_all(read(first.ssl, SCAN), secret)) == 2  # the decoy is there
    assert learn(read, objects).client_app == true.client_app
    assert verify(read, true, _pairs([s for s in objects if s is not first])) == 23


@pytest.mark.parametrize("field", ["client_app", "server_app", "exporter", "hs_a", "master_key", "tls_version",
                                   "cipher_id", "client_random"])
def test_a_wrong_candidate_is_rejected(objects, field):
    lay = learn(worker.read, objects)
    value = getattr(lay, field)
    wrong = dataclasses.replace(lay, **{field: (value[0], value[1] + 8) if field == "client_random" else value + 8})
    with pytest.raises(SearchError):
        verify(worker.read, wrong, _pairs(objects))


def test_another_objects_key_log_is_rejected(objects):
    lay = learn(worker.read, objects)
    a, b = objects[0], objects[2]  # two different handshakes
    with pytest.raises(SearchError):
        verify(worker.read, lay, [(a.ssl, b.lines)])


def test_needs_both_tls_versions(objects):
    with pytest.raises(SearchError):
        learn(worker.read, [s for s in objects if s.version == 0x0304])
