"""The job directory: one folder per job on the shared filesystem, and the protocol of its files.

This module owns the one interface between the login side and the compute nodes:

- the **layout** (:class:`JobDir`): what each file is called and who writes it;
- the **phases** a job goes through (:class:`Phase`);
- the **run identity** (:class:`Run`): a run is a Slurm job id plus its restart count
  (``SLURM_RESTART_COUNT``); every record names the run that wrote it, and :func:`is_current`
  is the one rule every reader on either side uses to decide whether a record is the current
  run's;
- the **records** (:class:`StateRecord` with its timeline of :class:`Mark`, :class:`HeadRecord`,
  :class:`EndpointRecord`, :class:`PreflightRecord`), written atomically (temporary name in the
  same folder, then rename) and read tolerantly: a missing, truncated, corrupt or foreign file
  is "absent", with one short warning, never a crash;
- **creation** (:func:`create_job_dir`): unique and atomic, private (0700), marked as ours, and
  undone by :meth:`JobDir.remove` when a submission fails.

The login side creates the directory and writes ``spec.json``, ``job.sbatch`` and the secrets;
the head node writes ``state.json``, ``head.json`` and ``endpoint.json``; every node writes its
pre-flight record (``preflight-<rank>.json``) and its log under ``logs/`` (``logs/attempt-N/``
for the N-th restart of a requeued job). When a new run starts, the head moves the previous
run's records next to that run's logs, so they are kept and never taken for the current run's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("slurm_vllm")

#: Marker in ``sbatch --comment`` that tags jobs of this tool for ``list``.
JOB_COMMENT = "slurm_vllm"

#: The file that marks a directory as created by this tool (``--job-dir`` may reuse only those).
MARKER = ".slurm_vllm"


class Phase(str, Enum):
    """The phases a user sees (PRODUCT.md §4). PENDING and UNKNOWN come from Slurm's side only."""

    PENDING = "PENDING"
    STARTING_RAY = "STARTING_RAY"
    LOADING_MODEL = "LOADING_MODEL"
    READY = "READY"
    DEGRADED = "DEGRADED"  # serving, with fewer replicas than asked
    ENDED = "ENDED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"

    @property
    def final(self) -> bool:
        """The job will not serve again (until Slurm requeues it, which starts a new run)."""
        return self in (Phase.ENDED, Phase.FAILED)

    @property
    def serving(self) -> bool:
        """An endpoint is published and should answer."""
        return self in (Phase.READY, Phase.DEGRADED)

    def __str__(self) -> str:
        return self.value


#: Phases the head may write into ``state.json``.
WRITTEN_PHASES = frozenset({Phase.STARTING_RAY, Phase.LOADING_MODEL, Phase.READY, Phase.DEGRADED,
                            Phase.ENDED, Phase.FAILED})


# --------------------------------------------------------------------------------------------
# Run identity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run of a job: its Slurm job id and how often Slurm restarted it (requeues).

    ``restart`` is None when the reader cannot know it (e.g. only accounting answered); then any
    attempt of the job matches.
    """

    job_id: str
    restart: int | None = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Run | None:
        """The run this process belongs to, from Slurm's variables (None outside a job)."""
        job_id = env.get("SLURM_JOB_ID", "").strip()
        if not job_id:
            return None
        return cls(job_id, parse_restart(env.get("SLURM_RESTART_COUNT")))

    def __str__(self) -> str:
        return self.job_id if not self.restart else f"{self.job_id} (attempt {self.restart})"


def parse_restart(value: object) -> int:
    """A restart count as Slurm writes it; anything unreadable counts as the first run (0)."""
    text = str(value if value is not None else "").strip()
    return int(text) if text.isdigit() else 0


def is_current(record: Record | None, run: Run | None) -> bool:
    """Whether ``record`` was written by ``run``: the one rule for "is this file from this run?".

    A record of another job (a reused directory), of another attempt (a requeue), or without a
    run at all is not. Without a known run (the job was never submitted) no record is current.
    """
    if record is None or run is None:
        return False
    if record.job_id != str(run.job_id):
        return False
    return run.restart is None or record.restart == run.restart


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class Record(BaseModel):
    """A JSON file of the protocol. Unknown keys are ignored (a newer writer may add some)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    FILE: ClassVar[str] = ""

    job_id: str
    restart: int = 0

    @property
    def run(self) -> Run:
        return Run(self.job_id, self.restart)

    def to_json(self) -> str:
        """The file's text: indented, sorted keys, one trailing newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def parse(cls: type[R], obj: object) -> R | None:
        """A record from already-loaded JSON (or a record); None when it is not one."""
        if isinstance(obj, cls):
            return obj
        try:
            return cls.model_validate(obj)
        except ValidationError:
            return None

    @classmethod
    def read(cls: type[R], path: Path) -> R | None:
        """The record in ``path``; None when missing, partial, corrupt or not a record.

        Anything but a missing file is reported once per file version as a short warning.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            _warn_once(path, f"cannot read {path}: {exc.strerror or exc}; ignoring it")
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            _warn_once(path, f"{path} is not valid JSON (truncated or corrupt); ignoring it")
            return None
        record = cls.parse(obj)
        if record is None:
            _warn_once(path, f"{path} is not a {cls.__name__} this tool wrote; ignoring it")
        return record

    def write(self, path: Path, mode: int = 0o644) -> None:
        """Atomically replace ``path`` with this record."""
        atomic_write(path, self.to_json(), mode)


R = TypeVar("R", bound=Record)


class Mark(BaseModel):
    """One moment of the run's timeline: when ``name`` (with ``detail``, e.g. ``2/4`` nodes) was
    first reached, in seconds since the epoch; ``ok`` is False for a step that was tried and failed.

    Phases have their own times (``phase_times``); marks are the moments in between that only
    the node side sees (see :mod:`slurm_vllm.timeline` for the names).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    at: float
    detail: str = ""
    ok: bool = True

    @property
    def key(self) -> tuple[str, str]:
        """What makes a mark unique in a run: a moment is recorded the first time only."""
        return self.name, self.detail


#: A replica's own phase (the job's phase is derived from all of them: READY, DEGRADED, FAILED).
ReplicaPhase = Literal["starting", "ready", "restarting", "failed", "ended"]


class ReplicaInfo(BaseModel):
    """One replica as a reader sees it (in ``state.json``'s ``replicas`` list).

    ``failed`` is final (no restart left); ``restarting`` means its vLLM exited and starts again.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    index: int
    nodes: list[str] = Field(default_factory=list)
    url: str = ""  # the replica's own base URL (http://ip:port/v1), reachable inside the cluster
    phase: ReplicaPhase = "starting"
    restarts: int = 0
    reason: str = ""
    log_tail: str = ""
    updated_at: float = 0.0

    @property
    def serving(self) -> bool:
        return self.phase == "ready"


class ReplicaRecord(ReplicaInfo, Record):
    """``replica-<i>.json``: one replica's vLLM as its first node sees it, written by that node only.

    ``master`` (``ip:port``, replicas of several nodes only) is set while a launch of the
    replica's vLLM is under way and empty between launches: the replica's other nodes start their
    headless part of attempt ``restarts`` when it appears and stop it when it goes.
    """

    FILE: ClassVar[str] = "replica-{index}.json"

    master: str = ""


#: A headless node's part of a replica: ``running`` its vLLM, or ``exited`` by itself.
HeadlessPhase = Literal["running", "exited"]


class HeadlessRecord(Record):
    """``headless-<rank>.json``: a replica's node other than its first, on its own headless vLLM
    (written by that node only). An ``exited`` record of the current attempt tells the replica's
    first node to restart the whole replica: its vLLM would not notice a remote part gone."""

    FILE: ClassVar[str] = "headless-{rank}.json"

    index: int
    rank: int
    host: str
    attempt: int  # the replica's ``restarts`` this vLLM was started for
    phase: HeadlessPhase = "running"
    reason: str = ""
    log_tail: str = ""
    updated_at: float = 0.0


#: A pre-flight check's outcome: ``fail`` ends the job before vLLM starts, ``warn`` is logged and kept.
CheckStatus = Literal["ok", "warn", "fail"]


class PreflightCheck(BaseModel):
    """One pre-flight check on one node (node/preflight.py), as ``state.json`` and ``status --json`` show it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node: str
    check: str
    status: CheckStatus
    detail: str = ""


class PreflightRecord(Record):
    """``preflight-<rank>.json``: one node's pre-flight checks, written by that node before vLLM starts.

    The head compares every node's ``model_fingerprint`` (the sha256 of the model's
    ``config.json``); its own record also carries the all-reduce's rendezvous port and, once it
    has decided, the ``verdict`` the other nodes wait for.
    """

    FILE: ClassVar[str] = "preflight-{rank}.json"

    rank: int
    host: str
    ip: str = ""
    interface: str = ""
    checks: list[PreflightCheck] = Field(default_factory=list)
    model_fingerprint: str = ""
    rendezvous_port: int | None = None
    verdict: Literal["", "passed", "failed"] = ""
    reason: str = ""
    written_at: float = 0.0


class StateRecord(Record):
    """``state.json``: where the head is (phase, nodes, reason), written only by the head."""

    FILE: ClassVar[str] = "state.json"

    phase: Phase
    reason: str = ""
    nodes_joined: int | None = None
    nodes_expected: int | None = None
    missing_hosts: list[str] = Field(default_factory=list)
    head_host: str = ""
    reported_by: str = ""
    log_tail: str = ""
    exit_code: int | None = None
    load_seconds: float | None = None
    ray_address: str = ""
    cluster_ready_seconds: float | None = None
    nodes: list[dict[str, Any]] = Field(default_factory=list)
    started_at: float = 0.0
    updated_at: float = 0.0
    phase_times: dict[str, float] = Field(default_factory=dict)
    # With replicas: each replica as the head last saw it, and how many are in the router.
    replicas: list[ReplicaInfo] = Field(default_factory=list)
    replicas_ready: int | None = None
    replicas_expected: int | None = None
    router_address: str = ""  # vllm-router's loopback address on the head node (never published beyond it)
    timeline: list[Mark] = Field(default_factory=list)
    preflight: list[PreflightCheck] = Field(default_factory=list)  # every node's checks, as the head saw them


class HeadRecord(Record):
    """``head.json``: the head's address and ports, for the other nodes of the same run."""

    FILE: ClassVar[str] = "head.json"

    ip: str
    host: str = ""
    gcs_port: int
    api_port: int | None = None
    published_at: float = 0.0


class EndpointRecord(Record):
    """``endpoint.json``: where the server answers (mode 0600, next to the key)."""

    FILE: ClassVar[str] = "endpoint.json"

    base_url: str
    model: str = ""
    host: str = ""
    port: int | None = None


_warned: set[tuple[str, float, int]] = set()


def _warn_once(path: Path, message: str) -> None:
    try:
        st = os.stat(path)
        key = (str(path), st.st_mtime, st.st_size)
    except OSError:
        key = (str(path), 0.0, 0)
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def default_jobs_root() -> Path:
    """Where job directories go unless the spec says otherwise (``$SLURM_VLLM_HOME/jobs``)."""
    home = os.environ.get("SLURM_VLLM_HOME")
    return (Path(home) if home else Path.home() / ".slurm_vllm") / "jobs"


#: The word that turns the compile caches off (``cache_dir: none``).
NO_CACHE = "none"


def cache_root(value: str | None) -> Path | None:
    """The compile caches' folder for a spec's ``cache_dir``: the given path, the per-user
    default beside the jobs root (``$SLURM_VLLM_HOME/cache``) when unset, None for ``none``."""
    if value is None or not value.strip():
        return default_jobs_root().parent / "cache"
    if value.strip().lower() == NO_CACHE:
        return None
    return Path(value).expanduser()


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Atomically write ``obj`` as indented JSON (``spec.json``; records use :meth:`Record.write`)."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def _mkdir_private(path: Path) -> bool:
    """Create ``path`` (and missing parents) 0700; True if this call created ``path`` itself."""
    for parent in reversed(path.parents):
        if not parent.exists():
            try:
                os.mkdir(parent, 0o700)
            except FileExistsError:
                pass
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    return True


def mkdir_private(path: Path) -> None:
    """Create ``path`` and missing parents 0700, leaving existing folders as they are; safe when
    another job creates the same folders at the same moment (the shared cache folder)."""
    _mkdir_private(Path(path))


@dataclass(frozen=True)
class JobDir:
    """Paths inside one job directory; constructing one touches nothing on disk."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser().absolute())

    # what the login side writes
    @property
    def marker(self) -> Path:
        """Says this tool created the directory (so a later ``--job-dir`` may reuse it)."""
        return self.path / MARKER

    @property
    def spec(self) -> Path:
        return self.path / "spec.json"

    @property
    def script(self) -> Path:
        return self.path / "job.sbatch"

    @property
    def api_key(self) -> Path:
        return self.path / "api_key"

    @property
    def ray_token(self) -> Path:
        return self.path / "ray_token"

    @property
    def job_id_file(self) -> Path:
        """Holds the Slurm job id; written by ``submit`` and again by the job when it starts."""
        return self.path / "job_id"

    # what the job writes
    @property
    def state(self) -> Path:
        return self.path / StateRecord.FILE

    @property
    def head(self) -> Path:
        """Where the head publishes its address and Ray port for the other nodes."""
        return self.path / HeadRecord.FILE

    @property
    def endpoint(self) -> Path:
        return self.path / EndpointRecord.FILE

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def attempt_logs(self, restart: int = 0) -> Path:
        """The log folder of one run: ``logs/`` for the first, ``logs/attempt-N/`` after requeues."""
        return self.logs if not restart else self.logs / f"attempt-{restart}"

    def node_log(self, rank: int, restart: int = 0) -> Path:
        return self.attempt_logs(restart) / f"node-{rank}.log"

    def ray_log(self, rank: int, restart: int = 0) -> Path:
        """``ray start``'s own output, kept apart from the node log to keep that one readable."""
        return self.attempt_logs(restart) / f"ray-{rank}.log"

    def replica(self, index: int) -> Path:
        """Where replica ``index``'s node reports its vLLM (ReplicaRecord)."""
        return self.path / ReplicaRecord.FILE.format(index=index)

    def read_replica(self, index: int, run: Run | None = None) -> ReplicaRecord | None:
        return _current(ReplicaRecord.read(self.replica(index)), run)

    def headless(self, rank: int) -> Path:
        """Where node ``rank``, a headless part of a replica, reports its vLLM (HeadlessRecord)."""
        return self.path / HeadlessRecord.FILE.format(rank=rank)

    def read_headless(self, rank: int, run: Run | None = None) -> HeadlessRecord | None:
        return _current(HeadlessRecord.read(self.headless(rank)), run)

    def preflight(self, rank: int) -> Path:
        """Where node ``rank`` writes its pre-flight checks (PreflightRecord)."""
        return self.path / PreflightRecord.FILE.format(rank=rank)

    def read_preflight(self, rank: int, run: Run | None = None) -> PreflightRecord | None:
        return _current(PreflightRecord.read(self.preflight(rank)), run)

    def router_log(self, restart: int = 0) -> Path:
        """vllm-router's and the authenticating front's output (rank 0, with replicas)."""
        return self.attempt_logs(restart) / "router.log"

    def vllm_log(self, restart: int = 0, rank: int = 0) -> Path:
        name = "vllm.log" if rank == 0 else f"vllm-{rank}.log"
        return self.attempt_logs(restart) / name

    @property
    def attempts(self) -> list[int]:
        """Restart counts that left a log folder, oldest first (always includes 0)."""
        found = {0}
        try:
            for p in self.logs.glob("attempt-*"):
                n = p.name.removeprefix("attempt-")
                if n.isdigit() and p.is_dir():
                    found.add(int(n))
        except OSError:
            pass
        return sorted(found)

    # ----- creating and removing

    @property
    def is_ours(self) -> bool:
        return self.marker.is_file()

    def _mark(self) -> None:
        from slurm_vllm import __version__  # noqa: PLC0415 - the package root is tiny

        atomic_write(self.marker, json.dumps({"tool": "slurm_vllm", "version": __version__,
                                              "created_at": time.time()}) + "\n", mode=0o600)

    def create(self) -> JobDir:
        """Create this directory as :func:`create_job_dir` does for ``--job-dir``."""
        return create_job_dir(self.path, "").jobdir

    def remove(self) -> None:
        """Remove the directory (only one this tool marked); used to undo a refused submission."""
        if self.is_ours:
            shutil.rmtree(self.path, ignore_errors=True)

    # ----- secrets and small files

    def write_secret(self, path: Path, value: str | None = None) -> str:
        """Write a secret readable by the user only (0600); generate one when ``value`` is None."""
        value = value or secrets.token_urlsafe(32)
        atomic_write(path, value + "\n", mode=0o600)
        return value

    def read_secret(self, path: Path) -> str | None:
        try:
            return path.read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_job_id(self) -> str | None:
        """The job id file's first word, when it is a job id."""
        try:
            words = self.job_id_file.read_text().split()
        except OSError:
            return None
        return words[0] if words and words[0].isdigit() else None

    # ----- records

    def read_state(self, run: Run | None = None) -> StateRecord | None:
        """``state.json`` if it is ``run``'s (any run when ``run`` is None)."""
        return _current(StateRecord.read(self.state), run)

    def read_head(self, run: Run | None = None) -> HeadRecord | None:
        return _current(HeadRecord.read(self.head), run)

    def read_endpoint(self, run: Run | None = None) -> EndpointRecord | None:
        return _current(EndpointRecord.read(self.endpoint), run)

    def archive_previous_run(self, run: Run) -> list[Path]:
        """Move records of any other run next to that run's logs, before ``run`` writes its own.

        Called by the head as a run starts, so a requeued job keeps every attempt's state and
        endpoint, and no reader can take them for the new run's.
        """
        moved = []
        records: list[tuple[type[Record], Path]] = [
            (StateRecord, self.state), (EndpointRecord, self.endpoint), (HeadRecord, self.head),
            *((ReplicaRecord, p) for p in sorted(self.path.glob(ReplicaRecord.FILE.format(index="*")))),
            *((HeadlessRecord, p) for p in sorted(self.path.glob(HeadlessRecord.FILE.format(rank="*")))),
            *((PreflightRecord, p) for p in sorted(self.path.glob(PreflightRecord.FILE.format(rank="*"))))]
        for cls, path in records:
            record = cls.read(path)
            if record is None or is_current(record, run):
                continue
            dest_dir = self.attempt_logs(record.restart) if record.job_id == run.job_id else \
                self.logs / f"job-{record.job_id}"
            dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest = dest_dir / path.name
            try:
                os.replace(path, dest)
                moved.append(dest)
            except OSError:
                pass
        return moved


#: Terminal colour codes (vLLM and Ray colour their messages).
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """Text without terminal colour codes: the one helper, for the login and the node side."""
    return _ANSI.sub("", text)


def tail_lines(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log (read from its last ``max_bytes``); "" when unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def spec_summary(jobdir: JobDir) -> dict[str, Any]:
    """The few fields of ``spec.json`` a listing shows (model, served name); {} when unreadable."""
    try:
        obj = json.loads(jobdir.spec.read_text(encoding="utf-8"))
        model = obj.get("model") or {}
        return {"model": str(model.get("served_name") or model.get("name") or "")}
    except (OSError, ValueError, AttributeError):
        return {}


def _current(record: R | None, run: Run | None) -> R | None:
    if record is None or run is None:
        return record
    return record if is_current(record, run) else None


class JobDirError(ValueError):
    """A job directory cannot be used; the message names it and the fix.

    Raised as :class:`~slurm_vllm.errors.SpecError` by the caller that knows the field.
    """

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path} {problem}: {fix}")


@dataclass(frozen=True)
class Created:
    """What :func:`create_job_dir` made: the directory, and whether it made the folder itself."""

    jobdir: JobDir
    made_folder: bool

    def undo(self) -> None:
        """Remove what was created: the whole folder if we made it, else only our files."""
        if self.made_folder:
            self.jobdir.remove()
            return
        for name in OUR_FILES:
            try:
                (self.jobdir.path / name).unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(self.jobdir.logs, ignore_errors=True)
        shutil.rmtree(self.jobdir.path / "submitit", ignore_errors=True)


#: Files this tool writes into a job directory from the login side.
OUR_FILES = (MARKER, "spec.json", "job.sbatch", "api_key", "ray_token", "job_id")


def create_job_dir(explicit: str | os.PathLike[str] | None, name: str,
                   root: Path | None = None, stamp: str | None = None) -> Created:
    """Create a job directory atomically, private (0700) and marked as this tool's.

    Without ``explicit``: ``<root>/<name>-<stamp>``, or ``-2``, ``-3``... when taken, decided
    by ``mkdir`` itself (no check-then-create), so concurrent submissions never share one.
    With ``explicit`` (``--job-dir``): the directory must be new, empty, or one this tool created
    whose job has been submitted before (its previous files move into ``previous/``). Anything
    else raises :class:`JobDirError`. The mode of a directory this tool did not create is never
    changed.
    """
    if explicit is not None:
        return _use_explicit(JobDir(Path(explicit)))
    root = root or default_jobs_root()
    _mkdir_private(root)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base = f"{name}-{stamp}"
    for n in range(1, 10_000):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        try:
            os.mkdir(candidate, 0o700)
        except FileExistsError:
            continue
        jd = JobDir(candidate)
        jd._mark()
        jd.logs.mkdir(mode=0o700)
        return Created(jd, made_folder=True)
    raise JobDirError(root / base, "has too many siblings", "remove old job directories (slurm-vllm cleanup)")


def _use_explicit(jd: JobDir) -> Created:
    path = jd.path
    if path.exists() and not path.is_dir():
        raise JobDirError(path, "is not a directory", "give a new or empty directory with --job-dir")
    if _mkdir_private(path):
        jd._mark()
        jd.logs.mkdir(mode=0o700)
        return Created(jd, made_folder=True)
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise JobDirError(path, f"cannot be read ({exc.strerror or exc})",
                          "give a directory you can write to with --job-dir") from None
    if not entries:
        if not os.access(path, os.W_OK | os.X_OK):
            raise JobDirError(path, "is not writable", "give a directory you can write to with --job-dir")
        jd._mark()
        jd.logs.mkdir(mode=0o700)
        return Created(jd, made_folder=False)
    if MARKER not in entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise JobDirError(path, f"already holds files this tool did not create ({shown})",
                          "give a new or empty directory with --job-dir, or leave it out for a fresh one")
    _set_previous_aside(jd, entries)
    jd._mark()
    jd.logs.mkdir(mode=0o700, exist_ok=True)
    return Created(jd, made_folder=False)


def _set_previous_aside(jd: JobDir, entries: Iterable[str]) -> None:
    """Move a previous submission's files in a reused job directory into ``previous/<n>/``."""
    names = [e for e in entries if e not in (MARKER, "previous")]
    if not names:
        return
    prev_root = jd.path / "previous"
    prev_root.mkdir(mode=0o700, exist_ok=True)
    label = jd.read_job_id() or "unsubmitted"
    n = 1
    while True:
        dest = prev_root / (label if n == 1 else f"{label}-{n}")
        try:
            os.mkdir(dest, 0o700)
            break
        except FileExistsError:
            n += 1
    for name in names:
        os.replace(jd.path / name, dest / name)


# --------------------------------------------------------------------------------------------
# The head's state file
# --------------------------------------------------------------------------------------------


#: The head writes state.json from more than one thread (its main flow, a helper asking Slurm
#: for the queue times): read-modify-write must not lose an update.
_STATE_LOCK = threading.RLock()


def write_state(jobdir: JobDir, run: Run, phase: Phase | str, marks: Iterable[Mark] = (),
                **fields: Any) -> StateRecord:
    """Merge ``fields`` into this run's ``state.json`` with a new phase and timestamp, atomically.

    Only the head writes this file (one lock serialises its threads), so read-modify-write needs
    no file lock. A file of another run is not merged into (it should have been archived; it is
    replaced). ``marks`` join the timeline unless a mark with the same name and detail is already
    there: each moment keeps the time it was first reached.
    """
    phase = Phase(phase)
    if phase not in WRITTEN_PHASES:
        raise ValueError(f"the job does not write phase {phase}")
    with _STATE_LOCK:
        old = jobdir.read_state(run)
        if old is not None and old.phase.final and not phase.final:
            # A run's end is its end: a late write from another thread (a progress line after a
            # failure was decided) adds its marks but does not bring the run back.
            phase, fields = old.phase, {}
        now = time.time()
        data: dict[str, Any] = old.model_dump() if old else {"started_at": now}
        times = dict(data.get("phase_times") or {})
        if data.get("phase") != phase:
            times[phase.value] = now
        timeline = [Mark.model_validate(m) for m in data.get("timeline") or []]
        seen = {m.key for m in timeline}
        for mark in marks:
            if mark.key not in seen:
                timeline.append(mark)
                seen.add(mark.key)
        data.update({k: ("" if v is None and k in ("reason", "log_tail") else v) for k, v in fields.items()})
        data.update(job_id=run.job_id, restart=run.restart or 0, phase=phase, updated_at=now, phase_times=times,
                    timeline=timeline)
        record = StateRecord.model_validate(data)
        record.write(jobdir.state)
        return record


def update_state(jobdir: JobDir, run: Run, marks: Iterable[Mark] = (), otherwise: Phase | None = None,
                 **fields: Any) -> StateRecord | None:
    """Merge ``fields`` and ``marks`` into this run's state, keeping its phase; with no state yet,
    write one in phase ``otherwise`` (None: write nothing and return None).

    The phase is read and written back under the lock, so a helper thread (the Slurm times, the
    pre-flight beside Ray's formation) never undoes a phase the main flow wrote in between.
    """
    with _STATE_LOCK:
        old = jobdir.read_state(run)
        phase = old.phase if old is not None else otherwise
        if phase is None:
            return None
        return write_state(jobdir, run, phase, marks=marks, **fields)


def add_marks(jobdir: JobDir, run: Run, *marks: Mark) -> StateRecord | None:
    """Add ``marks`` to this run's timeline, keeping its phase; None when the run has no state yet."""
    return update_state(jobdir, run, marks=marks)
