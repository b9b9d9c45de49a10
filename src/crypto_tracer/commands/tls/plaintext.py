"""tls -m text|json|streams: TLS plaintext as text or JSON, or into a file per connection and direction.

kernel (tls.bpf.c) -> ring buffer -> probes/tls.py -> pipeline/tls_data.py (per-connection
decode, filter, enrich, redact) -> sinks/text.py or sinks/json.py (per-connection formats)
"""

from __future__ import annotations

import time

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.log import is_verbose, log, ready

DEFAULT_RINGBUF = 8 << 20
# streams is the bulk-capture mode: a ring that holds ~0.2 s of a loopback download, so a reader
# that the traced programs keep off the CPU for a moment loses nothing (bench/bench_bulk.py)
STREAMS_RINGBUF = 64 << 20


def check(opts) -> None:
    if opts.model == "streams" and (not opts.output or opts.output == "-"):
        raise TracerError("-m streams needs -o DIR (the directory the stream files go to)", ExitStatus.BAD_ARGS)
    if opts.model == "json" and opts.format == "summary":
        raise TracerError("-f summary is not available for tls", ExitStatus.BAD_ARGS,
                          "use -f json-stream, json-array or json-pretty")
    from crypto_tracer.pipeline.filters.connections import compile_connection_filter

    compile_connection_filter(opts.filter)  # a bad filter is an argument error


def open_sink(opts):
    from crypto_tracer.sinks.output import Output

    if opts.model == "streams":
        from crypto_tracer.sinks.streams import StreamsSink

        return StreamsSink(opts.output, opts.max_payload)
    out = Output(opts.output)
    if opts.model == "text":
        from crypto_tracer.sinks.text import TextSink

        return TextSink(out, hex_output=opts.hex, tsize=opts.tsize)
    from crypto_tracer.sinks.json import make_json_sink

    return make_json_sink(opts.format, out)


def make_pipeline(opts, clock, stats, hello_facts=None):
    """The sink and the pipeline that feeds it, for the options of a run."""
    from crypto_tracer.pipeline.filters.connections import compile_connection_filter
    from crypto_tracer.pipeline.tls_data import TlsDataPipeline

    return TlsDataPipeline(open_sink(opts), stats, clock, conn_filter=compile_connection_filter(opts.filter),
                           redact_paths=not opts.no_redact, max_payload=opts.max_payload, hello_facts=hello_facts)


def fast_loop(opts, tracer, pipe):
    """The C formatting loop (pipeline/fastfmt.py) for text and json-stream, when it is built; None:
    the pure-Python loop (hex dumps, json arrays, streams, or no library)."""
    from crypto_tracer.engine.ringread import DirectRing
    from crypto_tracer.pipeline import fastfmt

    if getattr(pipe.sink, "fast_recipe", None) is None or (opts.model == "text" and opts.hex) or \
            not isinstance(tracer.rb, DirectRing):
        return None
    lib = fastfmt.load()
    if lib is None:
        return None
    from crypto_tracer.sinks.text import PRINTABLE

    pipe.fast = fastfmt.FastLoop(lib, tracer, pipe, text=opts.model == "text", plain_limit=opts.tsize or 1 << 62,
                                 printable=PRINTABLE)
    log.debug("tls: data records are formatted in C (%s)", fastfmt.library_path())
    return pipe.fast


def flight_secrets(tracer, facts):
    """The sessions' handshake traffic secrets, read from the hooked libraries as the key modes
    read them (keys/), to open TLS 1.3's encrypted flights (ALPN, certificates) in hello_facts:
    records handled as they are read, before the handshake record that follows them is."""
    from crypto_tracer.keys.extractor import KeyExtractor

    def on_lines(lines, _rec) -> None:
        for label, client_random, secret in lines:
            facts.add_secret(label, bytes.fromhex(client_random), bytes.fromhex(secret))

    from crypto_tracer.pipeline import tls13_flight

    # imported now (~50 ms, ~10 MB of RSS), not at the first flight: in the middle of a burst of new
    # connections that stall let the ring fill (Go's 50 concurrent clients lost records)
    tls13_flight.preload()
    return KeyExtractor(tracer, on_lines, quiet=True)


def run(opts) -> int:
    from crypto_tracer.pipeline.clock import WallClock
    from crypto_tracer.probes.common import (CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_KEYS, CT_EV_TLS_PEER,
                                             CT_EV_TLS_PROCESS)
    from crypto_tracer.probes.tls import TlsTracer
    from crypto_tracer.pipeline.runloop import StopFlag, run as run_loop
    from crypto_tracer.pipeline.stats import RunStats

    tracer = TlsTracer(pids=[opts.pid] if opts.pid else None, uid=opts.uid, name=opts.name,
                       libssl=opts.libssl or (), capture_data=True,
                       mapsize=opts.mapsize or (STREAMS_RINGBUF if opts.model == "streams" else DEFAULT_RINGBUF), max_payload=opts.max_payload)
    from crypto_tracer.pipeline.hello_facts import HelloFacts
    from crypto_tracer.probes import tls_hello

    stop = StopFlag().install()
    pipe = hello = None
    try:
        t0 = time.monotonic()
        clock = WallClock()
        stats = RunStats(tracer.counters)
        events = opts.model != "streams"  # streams files hold no handshake events
        facts = HelloFacts(flights=events)
        pipe = make_pipeline(opts, clock, stats, hello_facts=facts)
        for rtype in (CT_EV_TLS_DATA, CT_EV_TLS_HANDSHAKE, CT_EV_TLS_KEYS):
            tracer.on(rtype, pipe.batch.append)
        tracer.on(CT_EV_TLS_PROCESS, pipe.procs.learn)  # before the batch it precedes is processed
        tracer.on(CT_EV_TLS_PEER, pipe.learn_peer)  # likewise: NSS's ALPN and peer certificate
        keys = flight_secrets(tracer, facts) if events else None
        tracer.start()
        # handshake facts from the hello messages, on the tracer's own ring (they precede its records)
        hello = tls_hello.start_for(tracer, facts.add_raw, flights=True) if events else None
        if hello is not None:
            facts.done = hello.done
        if not tracer.libraries:
            log.warning("no TLS library found in %s yet; waiting for processes that load one",
                        f"process {opts.pid}" if opts.pid else "running processes")
        ready("tls", t0, f"{len(tracer.libraries)} TLS libraries hooked")

        fast = fast_loop(opts, tracer, pipe)

        def poll(timeout_ms: int) -> None:
            if fast is not None:
                fast.poll(timeout_ms)
            else:
                tracer.poll(timeout_ms)
                pipe.process()
            if hello is not None:
                hello.follow_links()

        def tick() -> None:
            clock.resync()
            stats.tick(is_verbose())

        run_loop(poll, opts.duration, stop, tick)
        if stop.signal:
            log.info("Shutdown requested, cleaning up...")
        if hello is not None:
            hello.detach()
        tracer.detach()  # nothing new arrives; then every submitted record is handled
        if fast is not None:
            fast.drain()
            log.debug("tls: %d records were formatted in C", fast.formatted)
        else:
            tracer.drain()
            pipe.process()
        if keys is not None:  # received, and no event of their own
            stats.received += keys.records
            stats.user_filtered += keys.records
        stats.report()
        return ExitStatus.OK
    finally:
        stop.restore()
        if pipe is not None:
            pipe.sink.close()
            if pipe.fast is not None:
                pipe.fast.close()
        if hello is not None:
            if hello.counters()["dropped"]:
                log.warning("%d handshake packets were lost (ring buffer full): some handshake facts are null",
                            hello.counters()["dropped"])
            hello.close()
        tracer.close()
