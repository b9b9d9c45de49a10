"""The user-space pipeline: decoded records -> events (schema) -> enrich -> filters -> redact -> sinks.

  events    the event schema: every event type and its fields, declared once
  enrich    monitor records -> events, with /proc facts, classification and decoded values
  filters/  what the user filters in user space (events, connections)
  redact    the redaction stage, applied by every command after its filters, before its sink
  stats     produced = written + filtered + dropped, for every run
  clock     boot-relative kernel time -> wall-clock ISO-8601
  runloop   poll until --duration, SIGINT or SIGTERM
  tls_data  tls records -> tls_data/tls_handshake events: per-connection cache, filter, redaction
  profile   the profile model: what one process did, aggregated
"""
