"""One small error hierarchy, so the CLI can map every failure to a sentence and an exit code.

Each class also subclasses the matching builtin, so callers who catch ``ValueError`` or
``TimeoutError`` keep working.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """The CLI's exit codes: the one table (docs/cli.md shows it)."""

    OK = 0
    ERROR = 1  #: anything else (a bug, an endpoint asked for too early)
    USAGE = 2  #: bad input, nothing submitted; or no such job
    SLURM = 3  #: Slurm refused, or the job waits for what will never come
    JOB_FAILED = 4  #: the job FAILED or ENDED
    TIMEOUT = 5  #: waiting ran out; the job goes on

#: Longest value an error message shows; the rest is cut (a value may be a whole file).
SHOWN_VALUE_CHARS = 120


def cut(text: str, limit: int = SHOWN_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: Any) -> str:
    """``repr(value)`` cut to a readable size, for a message that names a value."""
    return cut(repr(value))


class SlurmVllmError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = ExitCode.ERROR


class SpecError(SlurmVllmError, ValueError):
    """A spec value is wrong; raised before anything is written or submitted.

    Carries the field, the offending value and what to do instead, so the message can name all
    three.
    """

    exit_code = ExitCode.USAGE

    def __init__(self, field: str, value: Any, fix: str, problem: str | None = None) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        self.problem = problem or "is not valid"
        super().__init__(f"{cut(field)}={shown(value)} {self.problem}: {fix}")


class SpecErrors(SlurmVllmError, ValueError):
    """Several spec errors at once: users fix a file faster when they see every problem."""

    exit_code = ExitCode.USAGE

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class SlurmCommandError(SlurmVllmError, RuntimeError):
    """A Slurm command failed or refused; keeps Slurm's own words."""

    exit_code = ExitCode.SLURM

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        what = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{argv[0]} {what}: {self.stderr or '(no message)'}")


class JobNotFoundError(SlurmVllmError, LookupError):
    """No job directory or Slurm job matches what the user named."""

    exit_code = ExitCode.USAGE


class JobFailedError(SlurmVllmError, RuntimeError):
    """The job failed or ended before it became ready."""

    exit_code = ExitCode.JOB_FAILED

    def __init__(self, job_id: str | None, phase: str, reason: str, log_tail: str = "") -> None:
        self.job_id = job_id
        self.phase = phase
        self.reason = reason
        self.log_tail = log_tail
        msg = f"job {job_id or '?'} {phase}: {reason}"
        if log_tail:
            msg += "\n--- last lines of the log ---\n" + log_tail
        super().__init__(msg)


class JobEndedError(JobFailedError):
    """The job ended (cancelled, time limit, finished) before it was ready, or after it was.

    A :class:`JobFailedError` too, so code that catches that keeps working; exit code 4.
    """


class WaitTimeoutError(SlurmVllmError, TimeoutError):
    """Waiting for readiness ran past the caller's timeout; the job itself goes on."""

    exit_code = ExitCode.TIMEOUT


class JobBlockedError(SlurmVllmError, RuntimeError):
    """The job waits for something that will never happen (bad account, QOS, per-job limit).

    It is still queued; the message says why and how to cancel it. Exit code 3, like any other
    refusal by Slurm.
    """

    exit_code = ExitCode.SLURM


class EndpointNotReadyError(SlurmVllmError, RuntimeError):
    """The endpoint was asked for before the job published one."""

    exit_code = ExitCode.ERROR


class NodeError(SlurmVllmError, RuntimeError):
    """A failure inside the job on a compute node; the message names the node and the cause."""

    exit_code = ExitCode.ERROR
