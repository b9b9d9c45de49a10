"""TLS session secrets: struct layouts learned per library build, HKDF derivation, key log lines."""
