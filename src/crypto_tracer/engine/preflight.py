"""Start-up checks, in this order: privileges, then kernel features (arguments come first, in cli).

Each failure raises TracerError with one actionable message and its exit code:
3 for privileges, 4 for a missing kernel feature.
"""

from __future__ import annotations

import os

from crypto_tracer.errors import ExitStatus, TracerError

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _has(caps: int, cap: int) -> bool:
    return bool(caps >> cap & 1)


def check_bpf_privileges(need_net_admin: bool = False) -> None:
    """Root, or CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN); CAP_NET_ADMIN too for packet capture."""
    caps = effective_caps()
    bpf_ok = _has(caps, CAP_SYS_ADMIN) or (_has(caps, CAP_BPF) and _has(caps, CAP_PERFMON))
    if not bpf_ok:
        missing = [n for c, n in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not _has(caps, c)]
        raise TracerError(f"Insufficient privileges: eBPF tracing needs root or {' + '.join(missing)}",
                          ExitStatus.NO_PRIVILEGES,
                          "run with sudo, or from a systemd unit with "
                          "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_SYS_PTRACE")
    if need_net_admin and not (_has(caps, CAP_NET_ADMIN) or _has(caps, CAP_SYS_ADMIN)):
        raise TracerError("Insufficient privileges: packet capture (-m pcapng) needs CAP_NET_ADMIN",
                          ExitStatus.NO_PRIVILEGES, "run with sudo, or add CAP_NET_ADMIN")


def tracefs_path() -> str | None:
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def _mount_tracefs() -> str | None:
    """Mount tracefs at /sys/kernel/tracing when it is absent (needs CAP_SYS_ADMIN)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"tracefs", b"/sys/kernel/tracing", b"tracefs", 0, None) == 0:
        return tracefs_path()
    return None


def ensure_tracefs() -> str:
    """Tracepoints need tracefs: its path, mounted first when the system has not."""
    path = tracefs_path() or _mount_tracefs()
    if path is None:
        raise TracerError("tracefs is not mounted and could not be mounted", ExitStatus.KERNEL_FEATURE,
                          "mount it: mount -t tracefs tracefs /sys/kernel/tracing")
    return path


def ringbuf_supported() -> bool:
    """Ask the kernel (libbpf creates a probe map) rather than guess from the version."""
    from crypto_tracer.engine import lb

    m = lb()
    return m.libbpf_probe_bpf_map_type(m.BPF_MAP_TYPE_RINGBUF, None) == 1


def check_kernel_features() -> None:
    """BTF (for CO-RE), the BPF ring buffer (5.8+), and tracefs (mounted if absent)."""
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise TracerError("This kernel has no BTF (/sys/kernel/btf/vmlinux is missing)", ExitStatus.KERNEL_FEATURE,
                          "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distributions since 2021)")
    if not ringbuf_supported():
        raise TracerError(f"Kernel {os.uname().release} has no BPF ring buffer (needs Linux 5.8 or newer)",
                          ExitStatus.KERNEL_FEATURE, "upgrade the kernel to 5.8+ (5.15+ recommended)")
    ensure_tracefs()


def preflight(need_net_admin: bool = False) -> None:
    check_bpf_privileges(need_net_admin)
    check_kernel_features()
