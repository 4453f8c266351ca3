"""The job handle: what a user holds after submitting, or after naming a job by its id.

A :class:`Job` is a Slurm job id plus its job directory. Its status is built from three sources
only: Slurm's own state (through the shared, rate-limited poller), the head's ``state.json``
(trusted only when it names this job id, so a reused directory cannot lie) and an HTTP probe of the
endpoint's ``/health``. Log text is shown to people, never parsed for words.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slurm_vllm import slurm
from slurm_vllm.errors import (
    EndpointNotReadyError,
    JobBlockedError,
    JobFailedError,
    JobNotFoundError,
    SlurmVllmError,
    WaitTimeoutError,
)
from slurm_vllm.jobdir import ENDED, FAILED, LOADING_MODEL, READY, STARTING_RAY, JobDir, default_jobs_root

PENDING = "PENDING"
UNKNOWN = "UNKNOWN"

#: How many lines of a failing node's log a FAILED status carries.
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Endpoint:
    """Where and how to call the server: an OpenAI-compatible base URL, model name and key."""

    base_url: str
    model: str
    api_key: str | None
    host: str = ""
    port: int | None = None

    def env(self) -> dict[str, str]:
        """Environment variables understood by the ``openai`` client and most tools built on it."""
        return {"OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": self.api_key or "EMPTY"}

    def __repr__(self) -> str:  # never print the key
        return f"Endpoint(base_url={self.base_url!r}, model={self.model!r}, api_key={'***' if self.api_key else None})"


@dataclass
class JobStatus:
    """One snapshot of a job, in the phases users see (PRODUCT.md §4)."""

    job_id: str | None
    job_dir: str
    phase: str
    reason: str = ""
    slurm_state: str = ""
    nodes_joined: int | None = None
    nodes_expected: int | None = None
    url: str | None = None
    model: str | None = None
    healthy: bool | None = None
    blocked: bool = False
    log_tail: str = ""
    elapsed: str = ""
    checked_at: float = field(default_factory=time.time)

    @property
    def final(self) -> bool:
        return self.phase in (ENDED, FAILED)

    @property
    def ready(self) -> bool:
        return self.phase == READY and bool(self.healthy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for a terminal: ``READY http://...`` or ``PENDING (Resources: ...)``."""
        if self.phase == READY:
            text = f"READY {self.url}"
            if not self.healthy:
                text += f" (not answering from here: {self.reason})"
            return text
        if self.phase == STARTING_RAY and self.nodes_expected:
            text = f"STARTING_RAY {self.nodes_joined or 0}/{self.nodes_expected} nodes"
            return text + (f" ({self.reason})" if self.reason else "")
        return f"{self.phase} ({self.reason})" if self.reason else self.phase


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


def _root_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def probe_health(base_url: str, api_key: str | None = None, timeout: float = 3.0) -> tuple[bool, str]:
    """GET ``<root>/health``; (True, "") if it answers 200, else (False, why).

    Proxies from the environment are bypassed: a login node's HTTP proxy cannot reach compute
    nodes, and the key must not travel through it.
    """
    req = urllib.request.Request(_root_url(base_url) + "/health")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            if resp.status == 200:
                return True, ""
            return False, f"/health answered {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"/health answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"/health unreachable: {reason}"


#: The probe in use; tests may replace it.
PROBE: Callable[[str, str | None], tuple[bool, str]] = probe_health


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Combining the three sources
# --------------------------------------------------------------------------------------------


def combine(
    job_id: str | None,
    jobdir: JobDir,
    sjob: slurm.SlurmJob | None,
    state: dict[str, Any] | None,
    endpoint: dict[str, Any] | None,
    api_key: str | None,
    probe: Callable[[str, str | None], tuple[bool, str]] | None = None,
) -> JobStatus:
    """Decide the phase from Slurm's record, the head's state file and a health probe.

    Pure except for the probe, so every combination is unit-testable. Rules:
    Slurm says pending → PENDING with its reason (a requeued job's old state file is ignored);
    Slurm says running → the state file's phase, READY only with an endpoint file, and healthy only if
    the probe answers; Slurm says ended → the state file's final phase if it wrote one, else a
    reason from Slurm's state (cancelled, time limit, node failure, out of memory...).
    """
    probe = probe or PROBE
    if state is not None and job_id is not None and str(state.get("job_id", "")) not in ("", str(job_id)):
        state = None  # written by another job that used this directory
    st = dict(state or {})
    s_phase = st.get("phase")
    status = JobStatus(
        job_id=job_id,
        job_dir=str(jobdir.path),
        phase=UNKNOWN,
        nodes_joined=st.get("nodes_joined"),
        nodes_expected=st.get("nodes_expected"),
        slurm_state=(sjob.state.raw if sjob else ""),
        elapsed=(sjob.elapsed if sjob else ""),
    )
    if status.nodes_expected is None and sjob is not None and sjob.nodes:
        status.nodes_expected = sjob.nodes
    cat = sjob.category if sjob else slurm.Category.UNKNOWN

    def from_state_final() -> bool:
        if s_phase in (ENDED, FAILED):
            status.phase = s_phase
            status.reason = _plain(str(st.get("reason") or ""))
            status.log_tail = _plain(str(st.get("log_tail") or "") or (_failing_log_tail(jobdir) if s_phase == FAILED else ""))
            return True
        return False

    if cat is slurm.Category.PENDING:
        assert sjob is not None
        status.phase = PENDING
        reason = sjob.reason or slurm.parse_reason(None)
        if sjob.state.name == "PENDING":
            status.reason = str(reason)
        elif reason.code == "None":
            status.reason = sjob.state.meaning
        else:
            status.reason = f"{sjob.state.meaning}; {reason}"
        status.blocked = reason.blocked
        status.nodes_joined = None
        return status

    if cat in (slurm.Category.RUNNING, slurm.Category.SUSPENDED, slurm.Category.ENDING):
        if from_state_final():
            return status
        if cat is slurm.Category.ENDING:
            status.phase = ENDED
            status.reason = "job is completing"
            return status
        if s_phase == READY and endpoint:
            status.phase = READY
            status.url = endpoint.get("base_url")
            status.model = endpoint.get("model")
            ok, why = probe(str(status.url), api_key)
            status.healthy = ok
            status.reason = why
        elif s_phase in (STARTING_RAY, LOADING_MODEL, READY):
            status.phase = s_phase if s_phase != READY else LOADING_MODEL
            status.reason = str(st.get("reason") or "")
        else:
            status.phase = STARTING_RAY
            status.nodes_joined = 0
            status.reason = "job started; node programs starting"
        if cat is slurm.Category.SUSPENDED:
            status.reason = f"{sjob.state.meaning if sjob else 'suspended'}" + (f"; {status.reason}" if status.reason else "")
        return status

    if cat.final:
        assert sjob is not None
        if from_state_final():
            return status
        detail = f" {sjob.state.detail}" if sjob.state.detail else ""
        exit_note = f" (exit code {sjob.exit_code})" if sjob.exit_code and sjob.exit_code not in ("0:0", "") else ""
        if cat is slurm.Category.CANCELLED:
            status.phase, status.reason = ENDED, f"cancelled{detail}"
        elif cat is slurm.Category.TIMEOUT:
            status.phase, status.reason = ENDED, "time limit reached"
        elif cat is slurm.Category.COMPLETED:
            status.phase, status.reason = ENDED, "job finished"
        else:
            status.phase = FAILED
            status.reason = f"{sjob.state.name}: {sjob.state.meaning}{exit_note}"
            status.log_tail = _plain(_failing_log_tail(jobdir))
        return status

    # Slurm knows nothing (or an unknown state): trust a final state file, else say so.
    if from_state_final():
        return status
    if sjob is not None:
        status.reason = f"Slurm reports {sjob.state.raw!r}, a state this tool does not know"
    else:
        status.reason = (
            f"Slurm has no record of job {job_id}" if job_id else "no job id recorded in the job directory yet"
        )
    return status


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _plain(text: str) -> str:
    """Text without terminal colour codes (vLLM and Ray colour their messages)."""
    return _ANSI.sub("", text)


def _failing_log_tail(jobdir: JobDir) -> str:
    """The last lines of the log most likely to explain a failure.

    The node log written last is the one of the node that failed (the others were stopped after
    it); without node logs, the batch script's output.
    """
    candidates: list[Path] = []
    try:
        candidates = [p for p in jobdir.logs.iterdir() if p.is_file() and p.stat().st_size > 0]
    except OSError:
        return ""
    nodes = [p for p in candidates if p.name.startswith("node-")]
    pool = nodes or [p for p in candidates if p.name.startswith("batch")] or candidates
    if not pool:
        return ""
    newest = max(pool, key=lambda p: p.stat().st_mtime)
    tail = _tail(newest)
    return f"[{newest.name}]\n{tail}" if tail else ""


# --------------------------------------------------------------------------------------------
# Finding a job
# --------------------------------------------------------------------------------------------


def _looks_like_jobdir(path: Path) -> bool:
    return path.is_dir() and ((path / "spec.json").exists() or (path / "job.sbatch").exists())


def _local_index() -> dict[str, JobDir]:
    """Job id -> job directory for the directories under the default jobs root (no Slurm call)."""
    root = default_jobs_root()
    out: dict[str, JobDir] = {}
    if root.is_dir():
        for d in root.iterdir():
            jd = JobDir(d)
            jid = jd.read_job_id()
            if jid:
                out[jid] = jd
    return out


def _jobdir_from_record(job_id: str, sjob: slurm.SlurmJob | None) -> JobDir:
    if sjob is None:
        raise JobNotFoundError(f"job {job_id}: Slurm has no record of it and no job directory names it")
    workdir = Path(sjob.workdir) if sjob.workdir else None
    if workdir is None or not _looks_like_jobdir(workdir):
        raise JobNotFoundError(
            f"job {job_id} is not a slurm_vllm job: its working directory {sjob.workdir or '(unknown)'} "
            "is not a job directory (no spec.json or job.sbatch)"
        )
    return JobDir(workdir)


def attach_many(names: list[str], poller: slurm.Poller | None = None) -> list[Job]:
    """Handles for several jobs (ids or directories), asking Slurm once for all unknown ids."""
    poller = poller or slurm.POLLER
    index = _local_index()
    need = [n for n in names if n.isdigit() and not Path(n).is_dir() and n not in index]
    records = poller.get(need) if need else {}
    jobs = []
    for n in names:
        if n in records:
            jobs.append(Job(n, _jobdir_from_record(n, records[n]), poller=poller))
        elif n in index and n.isdigit():
            jobs.append(Job(n, index[n], poller=poller))
        else:
            jobs.append(Job.attach(n))
    return jobs


def find_jobdir(job_id: str, poller: slurm.Poller | None = None) -> JobDir:
    """The job directory of ``job_id``: the local index first, then Slurm's WorkDir for the job.

    Jobs submitted by hand from a rendered script are found the second way: the script sets
    ``--chdir`` to its job directory, which squeue/sacct report as the job's working directory.
    """
    local = _local_index().get(str(job_id))
    if local is not None:
        return local
    sjob = (poller or slurm.POLLER).get([str(job_id)]).get(str(job_id))
    return _jobdir_from_record(str(job_id), sjob)


# --------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------


ProgressFn = Callable[[JobStatus], None]


class Job:
    """A submitted job: its id and job directory, and what you can do with it.

    >>> job = slurm_vllm.attach("12345")        # doctest: +SKIP
    >>> job.wait_ready(timeout=1800)            # doctest: +SKIP
    >>> client = job.openai_client()            # doctest: +SKIP

    Used as a context manager, the job is cancelled when the block exits, so a notebook cell or
    script that fails does not leave GPUs allocated.
    """

    def __init__(self, job_id: str | None, job_dir: str | os.PathLike[str] | JobDir, poller: slurm.Poller | None = None) -> None:
        self.jobdir = job_dir if isinstance(job_dir, JobDir) else JobDir(Path(job_dir))
        self.job_id = str(job_id) if job_id is not None else self.jobdir.read_job_id()
        self._poller = poller or slurm.POLLER
        self._last: JobStatus | None = None

    # ----- finding
    @classmethod
    def attach(cls, job: str | os.PathLike[str]) -> Job:
        """A handle for a job named by its Slurm id or its job directory."""
        text = os.fspath(job)
        path = Path(text).expanduser()
        if not text.isdigit() or path.is_dir():
            if not _looks_like_jobdir(path):
                raise JobNotFoundError(f"{text!r} is neither a Slurm job id nor a job directory (no spec.json)")
            jd = JobDir(path)
            jid = jd.read_job_id()
            if jid is None:
                raise JobNotFoundError(f"job directory {jd.path} has no job_id file: was it ever submitted?")
            return cls(jid, jd)
        return cls(text, find_jobdir(text))

    @property
    def job_dir(self) -> Path:
        return self.jobdir.path

    # ----- state
    def slurm_info(self, force: bool = False) -> slurm.SlurmJob | None:
        if self.job_id is None:
            return None
        return self._poller.get([self.job_id], force=force)[self.job_id]

    def status(self, force: bool = False) -> JobStatus:
        """Where the job is now (one Slurm query at most, shared and rate-limited)."""
        st = combine(
            self.job_id, self.jobdir, self.slurm_info(force=force), self.jobdir.read_state(),
            self.jobdir.read_endpoint(), self.jobdir.read_secret(self.jobdir.api_key),
        )
        self._last = st
        return st

    def wait_ready(
        self,
        timeout: float | None = None,
        on_progress: ProgressFn | None = None,
        interval: float | None = None,
        fail_if_blocked: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> Endpoint:
        """Wait until the server answers, and return its endpoint.

        Keeps waiting while the job is queued, however long (bounded only by ``timeout``). Raises
        :class:`JobFailedError` if the job fails or ends first, :class:`WaitTimeoutError` when
        ``timeout`` passes (the job goes on), and :class:`JobBlockedError` if Slurm says the job
        will never start (unless ``fail_if_blocked`` is False). ``on_progress`` gets every status
        whose summary changed.
        """
        if interval is None:
            interval = float(os.environ.get("SLURM_VLLM_POLL_INTERVAL", "2"))
        deadline = None if timeout is None else clock() + timeout
        last_summary = None
        while True:
            st = self.status()
            summary = st.summary()
            if on_progress is not None and summary != last_summary:
                on_progress(st)
            last_summary = summary
            if st.ready:
                return self.endpoint
            if st.final:
                raise JobFailedError(self.job_id, st.phase, st.reason or "ended before it was ready", st.log_tail)
            if st.blocked and fail_if_blocked:
                raise JobBlockedError(
                    f"job {self.job_id} will not start: {st.reason}. It is still queued: fix the request and "
                    f"cancel it (slurm-vllm cancel {self.job_id})"
                )
            if st.phase == UNKNOWN and self.job_id is None:
                raise JobNotFoundError(f"{self.jobdir.path}: no job id recorded; was the job submitted?")
            if deadline is not None and clock() >= deadline:
                raise WaitTimeoutError(f"job {self.job_id} not ready after {timeout:g} s; last seen: {summary}")
            pause = interval if deadline is None else max(0.0, min(interval, deadline - clock()))
            sleep(pause)

    # ----- using the server
    @property
    def endpoint(self) -> Endpoint:
        """The published endpoint; raises :class:`EndpointNotReadyError` before the job wrote one."""
        ep = self.jobdir.read_endpoint()
        ep_job = ep.get("job_id") if ep else None
        if not ep or (self.job_id and ep_job is not None and str(ep_job) != str(self.job_id)):
            phase = self._last.summary() if self._last else "unknown"
            raise EndpointNotReadyError(f"job {self.job_id} has no endpoint yet (last seen: {phase}); wait for it first")
        port = ep.get("port")
        return Endpoint(
            base_url=str(ep["base_url"]),
            model=str(ep.get("model") or ""),
            api_key=self.jobdir.read_secret(self.jobdir.api_key),
            host=str(ep.get("host") or ""),
            port=int(port) if port is not None else None,
        )

    def openai_client(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this job's server (``openai`` is imported only here)."""
        import openai  # noqa: PLC0415 - heavy; only when asked for

        ep = self.endpoint
        kwargs.setdefault("base_url", ep.base_url)
        kwargs.setdefault("api_key", ep.api_key or "EMPTY")
        return openai.OpenAI(**kwargs)

    # ----- logs
    def log_path(self, node: int | str | None = None) -> Path:
        """Path of a log: node N's (default: the head, node 0), ``"vllm"`` or ``"batch"``."""
        if node is None:
            node = 0
        if isinstance(node, int) or str(node).isdigit():
            return self.jobdir.node_log(int(node))
        if node == "vllm":
            return self.jobdir.vllm_log
        if node == "batch":
            batch = sorted(self.jobdir.logs.glob("batch-*"))
            return batch[-1] if batch else self.jobdir.logs / f"batch-{self.job_id}.out"
        raise ValueError(f"node={node!r}: give a node number, 'vllm' or 'batch'")

    def logs(self, node: int | str | None = None, tail: int | None = None) -> str:
        """Text of one log (see :meth:`log_path`); empty if it does not exist yet."""
        path = self.log_path(node)
        if tail:
            return _tail(path, tail)
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def follow_logs(self, node: int | str | None = None, interval: float = 1.0) -> Iterator[str]:
        """Yield new log text as it is written, until the job has ended and the file is drained."""
        path = self.log_path(node)
        pos = 0
        while True:
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                yield chunk.decode("utf-8", "replace")
                continue
            sj = self.slurm_info()
            if sj is None or sj.category.final:
                return
            time.sleep(interval)

    # ----- ending
    def cancel(self, timeout: float = 120.0, sleep: Callable[[float], None] = time.sleep) -> JobStatus:
        """``scancel`` the job and return once Slurm says it has ended."""
        if self.job_id is None:
            raise JobNotFoundError(f"{self.jobdir.path}: no job id recorded; nothing to cancel")
        slurm.scancel(self.job_id)
        deadline = time.monotonic() + timeout
        while True:
            sj = self.slurm_info(force=True)
            if sj is None or sj.category.final:
                return self.status()
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(f"job {self.job_id} still {sj.state.raw} {timeout:g} s after scancel")
            sleep(1.0)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.cancel()
        except SlurmVllmError:
            if exc[0] is None:
                raise

    # ----- display
    def __repr__(self) -> str:
        last = f", {self._last.summary()}" if self._last else ""
        return f"<Job {self.job_id} {self.jobdir.path}{last}>"

    def _repr_html_(self) -> str:
        st = self._last or self.status()
        rows = [
            ("job id", st.job_id or "?"),
            ("phase", st.phase),
            ("reason", st.reason),
            ("nodes", f"{st.nodes_joined}/{st.nodes_expected}" if st.nodes_expected else ""),
            ("url", st.url or ""),
            ("model", st.model or ""),
            ("Slurm state", st.slurm_state),
            ("job dir", st.job_dir),
        ]
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v
        )
        return f"<table><caption>slurm_vllm job</caption>{body}</table>"


def statuses(jobs: list[Job], poller: slurm.Poller | None = None) -> list[JobStatus]:
    """Status of many jobs with one Slurm round trip for all of them."""
    poller = poller or slurm.POLLER
    ids = [j.job_id for j in jobs if j.job_id]
    infos = poller.get(ids) if ids else {}
    out = []
    for j in jobs:
        sj = infos.get(j.job_id) if j.job_id else None
        out.append(
            combine(j.job_id, j.jobdir, sj, j.jobdir.read_state(), j.jobdir.read_endpoint(), j.jobdir.read_secret(j.jobdir.api_key))
        )
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
