"""The key log sink: each line once, flushed at once, 0600."""

import os

from crypto_tracer.sinks.keylog import KeyLog

CR1, CR2 = "01" * 32, "02" * 32


def test_lines_are_written_once_and_at_once(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("old")
    path.chmod(0o644)
    log = KeyLog(str(path))
    first = log.add([("CLIENT_RANDOM", CR1, "aa" * 48)])
    assert first == f"CLIENT_RANDOM {CR1} {'aa' * 48}\n".encode()
    assert path.read_bytes() == first  # flushed before the run ends
    assert log.add([("CLIENT_RANDOM", CR1, "aa" * 48)]) == b""  # seen from the other side of the session
    log.add([("CLIENT_TRAFFIC_SECRET_0", CR2, "bb" * 32), ("SERVER_TRAFFIC_SECRET_0", CR2, "cc" * 32)])
    log.close()
    assert path.read_text().count("\n") == 3
    assert (log.lines_written, log.sessions) == (3, 2)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_without_a_file_lines_are_only_returned():
    log = KeyLog(None)
    assert log.add([("EXPORTER_SECRET", CR1, "dd" * 32)]).startswith(b"EXPORTER_SECRET ")
    log.close()
