"""The stages between decoding and the sinks: enrichment, filtering, redaction, per-connection caches."""
