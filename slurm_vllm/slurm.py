"""Everything this package asks of Slurm goes through here.

One runner (:func:`run`) calls Slurm's commands: argv lists, ``shell=False``, a timeout on every
call, stderr kept, failures raised as :class:`~slurm_vllm.errors.SlurmCommandError` with Slurm's own
words. Unit tests swap the subprocess call at that single boundary (:func:`use_runner`) and count
calls. On top of it: ``sbatch --parsable`` with a retry that cannot create a second job,
``squeue``/``sacct`` parsers with explicit formats and a delimiter that never occurs in names or
paths, a *total* table from Slurm job states to a few categories, pending reasons classified by
whether they can clear on their own, one batched and rate-limited poller, and ``scancel``.

A login node's ``slurmctld`` is shared by everyone, so status for many jobs costs one ``squeue``
call (plus one ``sacct`` call for the jobs ``squeue`` has already forgotten), never one per job.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from slurm_vllm.errors import SlurmCommandError
from slurm_vllm.jobdir import Run

#: Seconds a single Slurm command may take before it counts as failed (and, for sbatch, transient).
DEFAULT_TIMEOUT = 30.0

#: Field separator for squeue/sacct output: the ASCII unit separator never occurs in job names,
#: comments or paths that a user can type, unlike ``|`` or spaces.
SEP = "\x1f"

# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """What one Slurm command returned."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


#: Signature of the boundary: (argv, timeout) -> Completed. Raises subprocess.TimeoutExpired or
#: OSError like :func:`subprocess.run` does.
RunnerFn = Callable[[list[str], float], Completed]


def _subprocess_runner(argv: list[str], timeout: float) -> Completed:
    proc = subprocess.run(  # noqa: S603 - argv list, never a shell
        argv,
        shell=False,
        # Dates as ISO 8601 whatever the user's own SLURM_TIME_FORMAT says (job_times parses them).
        env={**os.environ, "SLURM_TIME_FORMAT": "standard"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Completed(list(argv), proc.returncode, proc.stdout, proc.stderr)


_runner: RunnerFn = _subprocess_runner


@contextlib.contextmanager
def use_runner(fn: RunnerFn) -> Iterator[RunnerFn]:
    """Replace the subprocess call for the duration of a ``with`` block (tests, dry runs)."""
    global _runner
    previous = _runner
    _runner = fn
    try:
        yield fn
    finally:
        _runner = previous


def run(argv: list[str], timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Completed:
    """Run one Slurm command; raise :class:`SlurmCommandError` if it fails and ``check`` is set.

    A timeout is reported with ``returncode=None``; a missing command with 127 and a hint.
    """
    argv = [str(a) for a in argv]
    try:
        done = _runner(argv, timeout)
    except subprocess.TimeoutExpired as exc:
        raise SlurmCommandError(argv, None, f"no answer within {timeout:g} s (Slurm controller busy or down?)") from exc
    except FileNotFoundError as exc:
        raise SlurmCommandError(argv, 127, f"{argv[0]}: command not found; run this on a Slurm login node") from exc
    except OSError as exc:
        raise SlurmCommandError(argv, 126, f"{argv[0]}: {exc}") from exc
    if check and done.returncode != 0:
        raise SlurmCommandError(argv, done.returncode, done.stderr or done.stdout)
    return done


#: stderr fragments of failures that say nothing about the job itself: the controller was busy,
#: restarting or unreachable. Lower case.
TRANSIENT_MARKERS = (
    "socket timed out",
    "temporarily unable",
    "unable to contact slurm controller",
    "slurm_persist_conn_open",
    "connection refused",
    "connection reset",
    "resource temporarily unavailable",
    "zero bytes were transmitted or received",
    "transport endpoint is not connected",
    "communication connection failure",
    "slurmctld is busy",
    "controller is busy",
)


def is_transient(err: SlurmCommandError) -> bool:
    """True if ``err`` looks like the controller hiccuped rather than refusing the request."""
    if err.returncode is None:
        return True
    text = err.stderr.lower()
    return any(m in text for m in TRANSIENT_MARKERS)


# --------------------------------------------------------------------------------------------
# The state table
# --------------------------------------------------------------------------------------------


class Category(str, Enum):
    """What a Slurm job state means for a user waiting on a server."""

    PENDING = "PENDING"  # not running yet; may start later
    RUNNING = "RUNNING"  # has its nodes
    SUSPENDED = "SUSPENDED"  # has (or had) its nodes but is paused
    ENDING = "ENDING"  # finishing; will end shortly
    COMPLETED = "COMPLETED"  # ended by itself with exit 0
    CANCELLED = "CANCELLED"  # ended by a user or an admin
    TIMEOUT = "TIMEOUT"  # ended by its time limit
    FAILED = "FAILED"  # ended by a failure (its own, a node's, memory, preemption...)
    UNKNOWN = "UNKNOWN"  # a state this table does not know, or no record at all

    @property
    def final(self) -> bool:
        return self in (Category.COMPLETED, Category.CANCELLED, Category.TIMEOUT, Category.FAILED)

    @property
    def active(self) -> bool:
        """The job holds (or is about to hold) nodes: the job directory may be changing."""
        return self in (Category.RUNNING, Category.SUSPENDED, Category.ENDING)


#: Every job state Slurm documents (long names; short codes below), with what it means.
STATE_TABLE: dict[str, tuple[Category, str]] = {
    "PENDING": (Category.PENDING, "waiting in the queue"),
    "CONFIGURING": (Category.PENDING, "nodes allocated, booting or being configured"),
    "REQUEUED": (Category.PENDING, "requeued; will run again"),
    "REQUEUE_FED": (Category.PENDING, "requeued by the federation"),
    "REQUEUE_HOLD": (Category.PENDING, "requeued and held; needs `scontrol release`"),
    "RESV_DEL_HOLD": (Category.PENDING, "held because its reservation was deleted"),
    "RUNNING": (Category.RUNNING, "running"),
    "RESIZING": (Category.RUNNING, "running; its size is changing"),
    "SIGNALING": (Category.RUNNING, "running; being signalled"),
    "SUSPENDED": (Category.SUSPENDED, "suspended; its CPUs were released to other jobs"),
    "STOPPED": (Category.SUSPENDED, "stopped (SIGSTOP); keeps its CPUs"),
    "COMPLETING": (Category.ENDING, "completing; processes are being cleaned up"),
    "STAGE_OUT": (Category.ENDING, "staging out files"),
    "UPDATE_DB": (Category.ENDING, "ending; accounting being updated"),
    "POWER_UP_NODE": (Category.PENDING, "waiting for nodes to power up"),
    "COMPLETED": (Category.COMPLETED, "completed with exit code 0"),
    "CANCELLED": (Category.CANCELLED, "cancelled"),
    "REVOKED": (Category.CANCELLED, "revoked: a sibling job of the federation started elsewhere"),
    "TIMEOUT": (Category.TIMEOUT, "reached its time limit"),
    "DEADLINE": (Category.FAILED, "missed its --deadline"),
    "FAILED": (Category.FAILED, "failed: non-zero exit code or launch failure"),
    "NODE_FAIL": (Category.FAILED, "a node of the job failed"),
    "BOOT_FAIL": (Category.FAILED, "a node failed to boot"),
    "OUT_OF_MEMORY": (Category.FAILED, "ran out of memory"),
    "PREEMPTED": (Category.FAILED, "preempted by a higher-priority job"),
    "SPECIAL_EXIT": (Category.FAILED, "held after a special exit code"),
    "LAUNCH_FAILED": (Category.FAILED, "failed to launch"),
}

#: squeue's compact codes (``%t``), for input that uses them.
SHORT_CODES = {
    "PD": "PENDING", "CF": "CONFIGURING", "RQ": "REQUEUED", "RF": "REQUEUE_FED",
    "RH": "REQUEUE_HOLD", "RD": "RESV_DEL_HOLD", "R": "RUNNING", "RS": "RESIZING",
    "SI": "SIGNALING", "S": "SUSPENDED", "ST": "STOPPED", "CG": "COMPLETING", "SO": "STAGE_OUT",
    "CD": "COMPLETED", "CA": "CANCELLED", "RV": "REVOKED", "TO": "TIMEOUT", "DL": "DEADLINE",
    "F": "FAILED", "NF": "NODE_FAIL", "BF": "BOOT_FAIL", "OOM": "OUT_OF_MEMORY",
    "PR": "PREEMPTED", "SE": "SPECIAL_EXIT",
}


@dataclass(frozen=True)
class SlurmState:
    """A parsed Slurm state: its base name, category, meaning and any detail Slurm appended."""

    raw: str
    name: str
    category: Category
    meaning: str
    detail: str = ""  # e.g. "by 1234" from "CANCELLED by 1234"


def parse_state(raw: str | None) -> SlurmState:
    """Map any state text Slurm prints to a :class:`SlurmState`; never raises.

    Handles ``CANCELLED by 123``, sacct's truncation mark ``+``, squeue's short codes, several
    flags joined by ``+`` or ``,`` (the first one decides) and states this table has never seen
    (category UNKNOWN, the text kept).
    """
    text = (raw or "").strip()
    if not text:
        return SlurmState(raw or "", "", Category.UNKNOWN, "no state reported")
    head, _, detail = text.partition(" ")
    first = re.split(r"[+,]", head.upper(), maxsplit=1)[0] or head.upper()
    name = SHORT_CODES.get(first, first)
    cat, meaning = STATE_TABLE.get(name, (Category.UNKNOWN, f"state {text!r} is not known to this tool"))
    return SlurmState(text, name, cat, meaning, detail.strip())


# --------------------------------------------------------------------------------------------
# Pending reasons
# --------------------------------------------------------------------------------------------


class ReasonKind(str, Enum):
    WAITING = "waiting"  # will clear on its own (resources, priority, a shared limit)
    HELD = "held"  # needs someone to release the job
    BLOCKED = "blocked"  # will not clear unless the request or the site's limits change


#: Reasons that will never clear by waiting: the request is invalid for this partition, account or
#: QOS, or exceeds a per-job limit.
_BLOCKED_EXACT = {
    "InvalidAccount": "the account is invalid or not yours",
    "InvalidQOS": "the QOS is invalid or not allowed for the account",
    "AccountNotAllowed": "the account may not use this partition",
    "QOSNotAllowed": "the QOS may not be used in this partition",
    "PartitionConfig": "the request does not fit the partition's configuration",
    "PartitionNodeLimit": "more nodes than the partition allows per job",
    "PartitionTimeLimit": "a longer time limit than the partition allows",
    "BadConstraints": "the constraints (features, GRES) match no node",
    "DependencyNeverSatisfied": "a dependency can never be satisfied",
}
_HELD_EXACT = {
    "JobHeldUser": "held by its user; run `scontrol release JOBID`",
    "JobHeldAdmin": "held by an administrator",
    "launch failed requeued held": "its launch failed; requeued and held",
}
#: Patterns: limits on a single job (PerJob), minimums a job does not meet, spent budgets
#: (``Grp...Minutes`` without ``Run``) and blocked partitions' per-job maxima.
_BLOCKED_PATTERNS = (
    (re.compile(r"^(Assoc|QOS)Max\w*PerJob\w*$"), "the job exceeds a per-job limit of its association or QOS"),
    (re.compile(r"^QOSMin\w*$"), "the job is below a minimum of its QOS"),
    (re.compile(r"^(Assoc|QOS)Grp(?!\w*Run)\w*Minutes\w*$", re.IGNORECASE), "the account's time budget is spent"),
    (re.compile(r"^(Assoc|QOS)MaxWall\w*$"), "the time limit exceeds the association's or QOS's maximum"),
)
_WAITING_HINTS = {
    "Resources": "waiting for free nodes",
    "Priority": "higher-priority jobs are ahead",
    "Dependency": "waiting for a dependency",
    "BeginTime": "its start time has not come",
    "None": "just submitted; not scheduled yet",
    "ReqNodeNotAvail": "a requested node is unavailable (reserved, down or drained)",
    "Reservation": "waiting for its reservation",
    "PartitionDown": "the partition is down; an administrator must bring it up",
    "PartitionInactive": "the partition is inactive",
    "NodeDown": "a node it needs is down",
    "Licenses": "waiting for licenses",
    "Prolog": "the prolog is running",
    "Cleaning": "requeued; being cleaned up",
    "AccountingPolicy": "an accounting limit holds it",
}


@dataclass(frozen=True)
class PendingReason:
    """Why a job waits, and whether waiting will ever help."""

    raw: str
    code: str
    kind: ReasonKind
    hint: str

    @property
    def blocked(self) -> bool:
        return self.kind is ReasonKind.BLOCKED

    def __str__(self) -> str:
        if self.code == "None":
            return self.hint
        return f"{self.raw}: {self.hint}" if self.hint and self.hint != self.raw else self.raw


def parse_reason(raw: str | None) -> PendingReason:
    """Classify squeue's reason text (``%r``); unknown reasons count as waiting."""
    text = (raw or "").strip().strip("()")
    if not text or text == "(null)":
        text = "None"
    if text in _HELD_EXACT:
        return PendingReason(text, text, ReasonKind.HELD, _HELD_EXACT[text])
    code = re.split(r"[ ,:]", text, maxsplit=1)[0]
    if code in _HELD_EXACT:
        return PendingReason(text, code, ReasonKind.HELD, _HELD_EXACT[code])
    if code in _BLOCKED_EXACT:
        return PendingReason(text, code, ReasonKind.BLOCKED, _BLOCKED_EXACT[code])
    for pattern, hint in _BLOCKED_PATTERNS:
        if pattern.match(code):
            return PendingReason(text, code, ReasonKind.BLOCKED, hint)
    if code.startswith(("AssocGrp", "QOSGrp", "AssocMax", "QOSMax", "Max")):
        return PendingReason(text, code, ReasonKind.WAITING, "waiting for a shared limit to free up")
    return PendingReason(text, code, ReasonKind.WAITING, _WAITING_HINTS.get(code, text))


# --------------------------------------------------------------------------------------------
# One job, as Slurm sees it
# --------------------------------------------------------------------------------------------


@dataclass
class SlurmJob:
    """One job's record from squeue or sacct."""

    job_id: str
    state: SlurmState
    reason: PendingReason | None = None
    name: str = ""
    workdir: str = ""
    nodes: int | None = None
    nodelist: str = ""
    comment: str = ""
    exit_code: str = ""
    elapsed: str = ""
    time_limit: str = ""
    restarts: int | None = None  # how often Slurm requeued it (squeue only; None: not known)
    source: str = "squeue"

    @property
    def run(self) -> Run:
        """The run Slurm is on now: (job id, restart count), the restart unknown from sacct."""
        return Run(self.job_id, self.restarts)

    @property
    def category(self) -> Category:
        return self.state.category

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.name or self.state.raw
        d["state_detail"] = self.state.detail
        d["category"] = self.state.category.value
        d["reason"] = None if self.reason is None else self.reason.raw
        d["reason_kind"] = None if self.reason is None else self.reason.kind.value
        return d


#: squeue's long-format fields (``--Format``: the restart count has no ``%`` code); size 0 means
#: "never cut", and each field but the last ends with the separator.
SQUEUE_FIELDS = ("JobID", "State", "Reason", "Name", "NumNodes", "NodeList", "TimeUsed", "TimeLimit",
                 "Comment", "RestartCnt", "WorkDir")
SACCT_FIELDS = ("JobID", "State", "Reason", "JobName", "NNodes", "NodeList", "Elapsed", "Timelimit", "ExitCode",
                "WorkDir")


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _rows(text: str, n: int) -> list[list[str]]:
    """Split Slurm's delimited output into rows of ``n`` fields, skipping lines not in our format."""
    rows = []
    for line in text.splitlines():
        parts = line.split(SEP, n - 1)
        if line.strip() and len(parts) == n:
            rows.append(parts)
    return rows


def _job(source: str, jid: str, state: str, reason: str, name: str, nodes: str, nodelist: str,
         elapsed: str, limit: str, workdir: str, **extra: Any) -> SlurmJob:
    """One SlurmJob from the fields squeue and sacct share."""
    st = parse_state(state)
    return SlurmJob(
        job_id=jid.strip(),
        state=st,
        reason=parse_reason(reason.strip()) if st.category is Category.PENDING else None,
        name=name,
        nodes=_int_or_none(nodes.strip()),
        nodelist=nodelist.strip(),
        elapsed=elapsed.strip(),
        time_limit=limit.strip(),
        workdir=workdir.rstrip("\n"),
        source=source,
        **extra,
    )


def parse_squeue(text: str) -> list[SlurmJob]:
    """Parse ``squeue --noheader -o`` output in :data:`SQUEUE_FIELDS` order."""
    jobs = []
    for jid, state, reason, name, nodes, nodelist, elapsed, limit, comment, restarts, workdir in _rows(
            text, len(SQUEUE_FIELDS)):
        jobs.append(_job("squeue", jid, state, reason, name, nodes, nodelist, elapsed, limit, workdir,
                         comment="" if comment.strip() == "(null)" else comment.strip(),
                         restarts=_int_or_none(restarts.strip())))
    return jobs


def parse_sacct(text: str) -> list[SlurmJob]:
    """Parse ``sacct -X --noheader --parsable2 --delimiter=SEP`` in :data:`SACCT_FIELDS` order.

    Only allocation lines are kept (no ``123.batch`` steps), so one line per job.
    """
    jobs = []
    for jid, state, reason, name, nodes, nodelist, elapsed, limit, exit_code, workdir in _rows(text, len(SACCT_FIELDS)):
        if "." not in jid:
            jobs.append(_job("sacct", jid, state, reason, name, nodes, nodelist, elapsed, limit, workdir,
                             exit_code=exit_code.strip()))
    return jobs


def squeue_argv(job_ids: Iterable[str] | None = None, me: bool = False) -> list[str]:
    fmt = ",".join(f"{f}:0{SEP}" for f in SQUEUE_FIELDS[:-1]) + f",{SQUEUE_FIELDS[-1]}:0"
    argv = ["squeue", "--noheader", "--states=all", "--Format=" + fmt]
    ids = list(job_ids or [])
    if ids:
        argv.append("--jobs=" + ",".join(ids))
    if me:
        argv.append("--me")
    return argv


def sacct_argv(job_ids: Iterable[str]) -> list[str]:
    return [
        "sacct", "--allocations", "--noheader", "--parsable2", "--delimiter=" + SEP,
        "--format=" + ",".join(SACCT_FIELDS), "--jobs=" + ",".join(job_ids),
    ]


def squeue(job_ids: Iterable[str] | None = None, me: bool = False, timeout: float = DEFAULT_TIMEOUT) -> list[SlurmJob]:
    """Jobs the controller still knows. Unknown ids are simply absent (never an error)."""
    ids = list(job_ids or [])
    try:
        done = run(squeue_argv(ids, me=me), timeout=timeout)
    except SlurmCommandError as err:
        # squeue refuses a list made only of ids it has forgotten; that means "none of them".
        if ids and "invalid job id" in err.stderr.lower():
            return []
        raise
    return parse_squeue(done.stdout)


def sacct(job_ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> list[SlurmJob]:
    """Finished jobs from accounting; empty when the site has no accounting."""
    ids = list(job_ids)
    if not ids:
        return []
    try:
        done = run(sacct_argv(ids), timeout=timeout)
    except SlurmCommandError as err:
        low = err.stderr.lower()
        if "accounting storage is disabled" in low or "not running a supported accounting_storage" in low:
            return []
        raise
    return parse_sacct(done.stdout)


# --------------------------------------------------------------------------------------------
# When a job was submitted and started (the queue wait)
# --------------------------------------------------------------------------------------------


def parse_slurm_time(text: str) -> float | None:
    """An ISO date as Slurm prints it (``2025-01-01T12:00:00``, local time) in epoch seconds;
    None for ``Unknown``, ``N/A``, ``None`` or anything else."""
    try:
        return _dt.datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class JobTimes:
    """When Slurm queued a job and when it gave it its nodes (None: not known, not started)."""

    submitted: float | None
    started: float | None

    @property
    def queue_wait(self) -> float | None:
        if self.submitted is None or self.started is None:
            return None
        return max(0.0, self.started - self.submitted)


def job_times(job_id: str, timeout: float = DEFAULT_TIMEOUT) -> JobTimes:
    """Submit and start time of one job: squeue while Slurm still lists it, else sacct.

    One call each at most, asked once per run (by the head as it starts, or by ``timeline``),
    never by the status poller. A pending job's StartTime is only Slurm's estimate: not a start.
    """
    fmt = f"JobID:0{SEP},State:0{SEP},SubmitTime:0{SEP},StartTime:0"
    argv = ["squeue", "--noheader", "--states=all", "--jobs=" + str(job_id), "--Format=" + fmt]
    try:
        rows = _rows(run(argv, timeout=timeout).stdout, 4)
    except SlurmCommandError as err:
        if "invalid job id" not in err.stderr.lower():
            raise
        rows = []
    if not rows:
        argv = ["sacct", "--allocations", "--noheader", "--parsable2", "--delimiter=" + SEP,
                "--format=JobID,State,Submit,Start", "--jobs=" + str(job_id)]
        rows = [r for r in _rows(run(argv, timeout=timeout).stdout, 4) if "." not in r[0]]
    for jid, state, submitted, started in rows:
        if jid.strip() == str(job_id):
            pending = parse_state(state).category is Category.PENDING
            return JobTimes(parse_slurm_time(submitted), None if pending else parse_slurm_time(started))
    return JobTimes(None, None)


# --------------------------------------------------------------------------------------------
# The poller: many jobs, one squeue call, rate-limited
# --------------------------------------------------------------------------------------------


class Poller:
    """Answers "what state are these jobs in" with one ``squeue`` (+ one ``sacct``) per interval.

    Results younger than ``min_interval`` seconds are served from the cache, so many handles and
    loops polling at once do not multiply the load on the controller. Finished jobs stay cached
    for good: their state will not change.
    """

    def __init__(self, min_interval: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, SlurmJob | None]] = {}

    def prime(self, jobs: Iterable[SlurmJob]) -> None:
        """Cache records fetched elsewhere (``list`` has them from its own squeue call)."""
        with self._lock:
            now = self._clock()
            for j in jobs:
                self._cache[j.job_id] = (now, j)

    def get(self, job_ids: Iterable[str], force: bool = False) -> dict[str, SlurmJob | None]:
        """State of every id in ``job_ids``; ``None`` for jobs neither squeue nor sacct knows."""
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        with self._lock:
            now = self._clock()
            stale = [
                j for j in ids
                if force or j not in self._cache
                or (not self._is_final(self._cache[j][1]) and now - self._cache[j][0] >= self.min_interval)
            ]
            if stale:
                found = {j.job_id: j for j in squeue(stale)}
                missing = [j for j in stale if j not in found]
                if missing:
                    found.update({j.job_id: j for j in sacct(missing) if j.job_id in missing})
                now = self._clock()
                for j in stale:
                    self._cache[j] = (now, found.get(j))
            return {j: self._cache[j][1] for j in ids}

    @staticmethod
    def _is_final(job: SlurmJob | None) -> bool:
        return job is not None and job.category.final


#: The process-wide poller that every job handle shares.
POLLER = Poller(min_interval=float(os.environ.get("SLURM_VLLM_POLL_INTERVAL", "2")))


# --------------------------------------------------------------------------------------------
# sbatch, scancel, list
# --------------------------------------------------------------------------------------------


def kill_wait(timeout: float = 5.0) -> float | None:
    """Slurm's KillWait (seconds between a step's SIGTERM and its SIGKILL); None if unknown."""
    try:
        out = run(["scontrol", "show", "config"], timeout=timeout).stdout
    except SlurmCommandError:
        return None
    match = re.search(r"^KillWait\s*=\s*(\d+)", out, re.MULTILINE)
    return float(match.group(1)) if match else None


def parse_sbatch_parsable(stdout: str) -> str:
    """``sbatch --parsable`` prints ``ID`` or ``ID;CLUSTER``; return the id."""
    for raw in stdout.splitlines():
        line = raw.strip()
        if line:
            jid = line.split(";", 1)[0].strip()
            if jid.isdigit():
                return jid
    raise SlurmCommandError(["sbatch"], 0, f"could not read a job id from sbatch's output {stdout!r}")


def find_job_by_workdir(workdir: Path | str, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """Id of a job of this user whose working directory is ``workdir``, if squeue lists one.

    Each job directory is used for one submission only, so a match is the job we submitted.
    """
    target = os.path.realpath(os.fspath(workdir))
    for job in squeue(me=True, timeout=timeout):
        if job.workdir and os.path.realpath(job.workdir) == target:
            return job.job_id
    return None


def sbatch(
    script: Path | str,
    workdir: Path | str,
    extra_args: Iterable[str] = (),
    attempts: int = 3,
    backoff: float = 2.0,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Submit ``script`` once and return the job id, even if the first answer got lost.

    After a transient failure (the controller timed out or was busy) sbatch may have queued the job
    anyway. Before trying again we look for a job of ours already running from ``workdir`` (the job
    directory, which the script names with ``--chdir``); only if there is none do we resubmit. If
    Slurm cannot even be asked, we stop and say so rather than risk a second job. Refusals (bad
    partition, account, QOS, resources) are not retried and keep Slurm's message.
    """
    argv = ["sbatch", "--parsable", *extra_args, os.fspath(script)]
    last: SlurmCommandError | None = None
    for attempt in range(attempts):
        if attempt:
            sleep(backoff * attempt)
            try:
                existing = find_job_by_workdir(workdir)
            except SlurmCommandError as err:
                raise SlurmCommandError(
                    argv, None,
                    f"sbatch failed ({last.stderr if last else '?'}) and squeue could not tell whether the job "
                    f"was queued anyway ({err.stderr}); check `squeue --me` before submitting {workdir} again",
                ) from err
            if existing:
                return existing
        try:
            return parse_sbatch_parsable(run(argv, timeout=timeout).stdout)
        except SlurmCommandError as err:
            if not is_transient(err):
                raise
            last = err
    assert last is not None
    raise last


def scancel(job_id: str, signal: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Cancel a job (or send it a signal); cancelling a finished job is not an error."""
    argv = ["scancel"] + ([f"--signal={signal}"] if signal else []) + [str(job_id)]
    try:
        run(argv, timeout=timeout)
    except SlurmCommandError as err:
        if "already completing or completed" in err.stderr.lower():
            return
        raise


__all__ = [
    "Category", "Completed", "JobTimes", "POLLER", "PendingReason", "Poller", "ReasonKind", "SEP", "STATE_TABLE",
    "SlurmJob", "SlurmState", "find_job_by_workdir", "is_transient", "job_times", "parse_reason",
    "parse_sacct", "parse_sbatch_parsable", "parse_squeue", "parse_state", "run", "sacct", "sbatch",
    "scancel", "squeue", "use_runner",
]
