"""crypto-tracer: live view of a Linux host's use of cryptography, with eBPF."""

__version__ = "1.0.0"
