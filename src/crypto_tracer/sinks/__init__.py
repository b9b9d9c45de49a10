"""Output sinks. Each takes events (dicts) and writes them; close() leaves a valid file."""
