"""Exit statuses and the one exception type that carries them to the CLI."""

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0  # also a run ended by SIGINT/SIGTERM or --duration
    ERROR = 1  # general error: output unwritable, target not found, ...
    BAD_ARGS = 2
    NO_PRIVILEGES = 3
    KERNEL_FEATURE = 4  # kernel lacks BTF, ring buffer, tracefs, ...
    BPF_FAILURE = 5  # eBPF load or attach failed


class TracerError(Exception):
    """An error the user can act on: printed as one or two lines, no traceback."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.ERROR, hint: str | None = None):
        super().__init__(message)
        self.status = status
        self.hint = hint

    def __str__(self) -> str:
        text = self.args[0]
        return f"{text}\n  -> {self.hint}" if self.hint else text
