"""The job handle: what a user holds after submitting, or after naming a job by its id.

A :class:`Job` is a Slurm job id plus its job directory. Its status is built from three sources
only: Slurm's own state (through the shared, rate-limited poller), the head's ``state.json``
(trusted only when it names this job id, so a reused directory cannot lie) and an HTTP probe of the
endpoint's ``/health``. Log text is shown to people, never parsed for words.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slurm_vllm import direct_http, slurm, timeline
from slurm_vllm.errors import (
    EndpointNotReadyError,
    JobBlockedError,
    JobEndedError,
    JobFailedError,
    JobNotFoundError,
    SlurmCommandError,
    SlurmVllmError,
    WaitTimeoutError,
)
from slurm_vllm.jobdir import (
    EndpointRecord,
    JobDir,
    Phase,
    Run,
    StateRecord,
    is_current,
    plain,
    spec_summary,
    tail_lines,
)

#: How many lines of a failing node's log a FAILED status carries.
LOG_TAIL_LINES = 20

#: A status younger than this is shown again rather than asked for again (one display, one call).
DISPLAY_REUSE_S = 1.0

#: How long ``wait`` keeps asking about a job Slurm has no record of before it gives up: long
#: enough for accounting to catch up with a job that just ended, short enough not to hang.
FORGOTTEN_GRACE = 30.0


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
    phase: Phase
    reason: str = ""
    restart: int | None = None  # the run: how often Slurm requeued the job (None: not known)
    slurm_state: str = ""
    nodes_joined: int | None = None
    nodes_expected: int | None = None
    replicas_ready: int | None = None  # with replicas: how many the router sends requests to
    replicas_expected: int | None = None
    replicas: list[dict[str, Any]] = field(default_factory=list)  # index, nodes, url, phase, restarts, reason
    url: str | None = None
    model: str | None = None
    healthy: bool | None = None
    blocked: bool = False
    forgotten: bool = False  # Slurm has no record of the job and no record of ours is final
    log_tail: str = ""
    elapsed: str = ""
    timeline: list[dict[str, Any]] = field(default_factory=list)  # this run's moments (timeline.py)
    durations: dict[str, float] = field(default_factory=dict)  # seconds per stretch: queued, ray, ...
    preflight: list[dict[str, Any]] = field(default_factory=list)  # every node's checks: node, check, status, detail
    checked_at: float = field(default_factory=time.time)

    @property
    def final(self) -> bool:
        return self.phase.final

    @property
    def ready(self) -> bool:
        return self.phase.serving and bool(self.healthy)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phase"] = self.phase.value
        return d

    def summary(self) -> str:
        """One line for a terminal: ``READY http://...`` or ``PENDING (Resources: ...)``."""
        if self.phase.serving:
            counted = f" {self.replicas_ready}/{self.replicas_expected} replicas" if self.replicas_expected else ""
            text = f"{self.phase}{counted} {self.url}"
            if not self.healthy:
                text += f" (not answering from here: {self.reason})"
            return text
        if self.phase is Phase.LOADING_MODEL and self.replicas_expected:
            return f"LOADING_MODEL {self.replicas_ready or 0}/{self.replicas_expected} replicas ready"
        if self.phase is Phase.STARTING_RAY and self.nodes_expected:
            text = f"STARTING_RAY {self.nodes_joined or 0}/{self.nodes_expected} nodes"
            return text + (f" ({self.reason})" if self.reason else "")
        return f"{self.phase} ({self.reason})" if self.reason else str(self.phase)


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


def probe_health(base_url: str, api_key: str | None = None, timeout: float = 3.0) -> tuple[bool, str]:
    """GET ``<root>/health``; (True, "") if it answers 200, else (False, why).

    Proxies from the environment are bypassed: a login node's HTTP proxy cannot reach compute
    nodes, and the key must not travel through it.
    """
    try:
        status, _ = direct_http.get(direct_http.root_url(base_url) + "/health", api_key, timeout)
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"/health unreachable: {reason}"
    return (True, "") if status == 200 else (False, f"/health answered {status}")


#: The probe in use; tests may replace it.
PROBE: Callable[[str, str | None], tuple[bool, str]] = probe_health


# --------------------------------------------------------------------------------------------
# Combining the three sources
# --------------------------------------------------------------------------------------------


def combine(
    job_id: str | None,
    jobdir: JobDir,
    sjob: slurm.SlurmJob | None,
    state: StateRecord | Mapping[str, Any] | None,
    endpoint: EndpointRecord | Mapping[str, Any] | None,
    api_key: str | None,
    probe: Callable[[str, str | None], tuple[bool, str]] | None = None,
) -> JobStatus:
    """Decide the phase from Slurm's record, the head's records and a health probe.

    Pure except for the probe, so every combination is unit-testable. Records count only when
    :func:`~slurm_vllm.jobdir.is_current` says they are this run's (Slurm's job id and restart
    count). Rules: Slurm says pending → PENDING with its reason (``requeued`` when the job has run
    before); Slurm says running → the state record's phase, READY only with an endpoint record,
    and healthy only if the probe answers; Slurm says ended → the state record's final phase if
    it wrote one, else a reason from Slurm's state (cancelled, time limit, node failure, ...).
    """
    probe = probe or PROBE
    run = sjob.run if sjob is not None else (Run(str(job_id), None) if job_id else None)
    any_state = StateRecord.parse(state) if state is not None else None
    st = any_state if is_current(any_state, run) else None
    ep = EndpointRecord.parse(endpoint) if endpoint is not None else None
    ep = ep if is_current(ep, run) else None
    status = JobStatus(
        job_id=job_id,
        job_dir=str(jobdir.path),
        phase=Phase.UNKNOWN,
        restart=sjob.restarts if sjob is not None and sjob.restarts is not None else (st.restart if st else None),
        nodes_joined=st.nodes_joined if st else None,
        nodes_expected=st.nodes_expected if st else None,
        replicas_ready=st.replicas_ready if st and st.replicas_expected else None,
        replicas_expected=st.replicas_expected if st else None,
        replicas=[r.model_dump(mode="json", exclude={"log_tail", "updated_at"}) for r in st.replicas] if st else [],
        slurm_state=(sjob.state.raw if sjob else ""),
        elapsed=(sjob.elapsed if sjob else ""),
        model=spec_summary(jobdir).get("model") or None,
        preflight=[c.model_dump(mode="json") for c in st.preflight] if st else [],
    )
    if status.nodes_expected is None and sjob is not None and sjob.nodes:
        status.nodes_expected = sjob.nodes
    moments = timeline.build(st)
    status.timeline, status.durations = [m.to_dict() for m in moments], timeline.durations(moments)
    cat = sjob.category if sjob else slurm.Category.UNKNOWN
    attempt = status.restart or 0

    def from_state_final() -> bool:
        if st is not None and st.phase.final:
            status.phase = st.phase
            status.reason = plain(st.reason)
            tail = st.log_tail or (_failing_log_tail(jobdir, attempt) if st.phase is Phase.FAILED else "")
            status.log_tail = plain(tail)
            return True
        return False

    if cat is slurm.Category.PENDING:
        assert sjob is not None
        status.phase = Phase.PENDING
        reason = sjob.reason or slurm.parse_reason(None)
        ran_before = bool(sjob.restarts) or (any_state is not None and any_state.job_id == sjob.job_id)
        if sjob.state.name == "PENDING":
            status.reason = f"requeued; {reason}" if ran_before else str(reason)
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
            if sjob is not None and sjob.restarts and st is None:
                # Requeued: Slurm counts the new run while it still cleans up the previous one.
                status.phase, status.reason = Phase.PENDING, "requeued; the previous run is completing"
                status.nodes_joined = None
                return status
            status.phase = Phase.ENDED
            status.reason = "job is completing"
            return status
        if st is not None and st.phase.serving and ep is not None:
            status.phase = st.phase
            status.url = ep.base_url
            status.model = ep.model or status.model
            ok, why = probe(ep.base_url, api_key)
            status.healthy = ok
            status.reason = why
        elif st is not None and st.phase in (Phase.STARTING_RAY, Phase.LOADING_MODEL, Phase.READY, Phase.DEGRADED):
            status.phase = st.phase if not st.phase.serving else Phase.LOADING_MODEL
            status.reason = st.reason
        else:
            status.phase = Phase.STARTING_RAY
            status.nodes_joined = 0
            status.reason = "job started; node programs starting"
        if cat is slurm.Category.SUSPENDED:
            meaning = sjob.state.meaning if sjob else "suspended"
            status.reason = meaning + (f"; {status.reason}" if status.reason else "")
        return status

    if cat.final:
        assert sjob is not None
        if from_state_final():
            return status
        detail = f" {sjob.state.detail}" if sjob.state.detail else ""
        exit_note = f" (exit code {sjob.exit_code})" if sjob.exit_code and sjob.exit_code not in ("0:0", "") else ""
        if cat is slurm.Category.CANCELLED:
            status.phase, status.reason = Phase.ENDED, f"cancelled{detail}"
        elif cat is slurm.Category.TIMEOUT:
            status.phase, status.reason = Phase.ENDED, "time limit reached"
        elif cat is slurm.Category.COMPLETED:
            status.phase, status.reason = Phase.ENDED, "job finished"
        else:
            status.phase = Phase.FAILED
            status.reason = f"{sjob.state.name}: {sjob.state.meaning}{exit_note}"
            status.log_tail = plain(_failing_log_tail(jobdir, attempt))
        return status

    # Slurm knows nothing (or an unknown state): trust a final state record, else say so.
    if from_state_final():
        return status
    if sjob is not None:
        status.reason = f"Slurm reports {sjob.state.raw!r}, a state this tool does not know"
    else:
        status.forgotten = job_id is not None
        status.reason = (
            f"Slurm has no record of job {job_id}" if job_id else "no job id recorded in the job directory yet"
        )
    return status




def _failing_log_tail(jobdir: JobDir, restart: int = 0) -> str:
    """The last lines of the log most likely to explain a failure of run ``restart``.

    The node log written last is the one of the node that failed (the others were stopped after
    it); without node logs, the batch script's output.
    """
    folder = jobdir.attempt_logs(restart)
    try:
        candidates = [p for p in folder.iterdir() if p.is_file() and p.stat().st_size > 0]
    except OSError:
        return ""
    nodes = [p for p in candidates if p.name.startswith("node-")]
    batch = [p for p in jobdir.logs.glob("batch-*") if p.is_file() and p.stat().st_size > 0]
    pool = nodes or batch or candidates
    if not pool:
        return ""
    newest = max(pool, key=lambda p: p.stat().st_mtime)
    tail = tail_lines(newest, LOG_TAIL_LINES)
    return f"[{newest.name}]\n{tail}" if tail else ""


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

    def __init__(self, job_id: str | None, job_dir: str | os.PathLike[str] | JobDir,
                 poller: slurm.Poller | None = None) -> None:
        self.jobdir = job_dir if isinstance(job_dir, JobDir) else JobDir(Path(job_dir))
        self.job_id = str(job_id) if job_id is not None else self.jobdir.read_job_id()
        self._poller = poller or slurm.POLLER
        self._last: JobStatus | None = None

    # ----- finding
    @classmethod
    def attach(cls, job: str | os.PathLike[str]) -> Job:
        """A handle for a job named by its Slurm id or its job directory."""
        from slurm_vllm.catalog import find  # noqa: PLC0415 - catalog builds on this module

        return find(job)

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
        self._last = status_of(self, self.slurm_info(force=force))
        return self._last

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

        Keeps waiting while the job is queued, however long (bounded only by ``timeout``), and
        through a requeue. Raises :class:`JobFailedError` if the job fails (:class:`JobEndedError`
        if it ends) first, or if Slurm forgets the job for :data:`FORGOTTEN_GRACE` seconds;
        :class:`WaitTimeoutError` when ``timeout`` passes (the job goes on); and
        :class:`JobBlockedError` if Slurm says the job will never start (unless
        ``fail_if_blocked`` is False). ``on_progress`` gets every status whose summary changed.
        """
        if interval is None:
            interval = float(os.environ.get("SLURM_VLLM_POLL_INTERVAL", "2"))
        deadline = None if timeout is None else clock() + timeout
        last_summary = None
        forgotten_since: float | None = None
        while True:
            st = self.status()
            summary = st.summary()
            if on_progress is not None and summary != last_summary:
                on_progress(st)
            last_summary = summary
            if st.ready:
                return self.endpoint
            if st.final:
                raise _over_error(self.job_id, st)
            if st.blocked and fail_if_blocked:
                raise JobBlockedError(
                    f"job {self.job_id} will not start: {st.reason}. It is still queued: fix the request and "
                    f"cancel it (slurm-vllm cancel {self.job_id})"
                )
            if st.phase is Phase.UNKNOWN and self.job_id is None:
                raise JobNotFoundError(f"{self.jobdir.path}: no job id recorded; was the job submitted?")
            if st.forgotten:
                forgotten_since = clock() if forgotten_since is None else forgotten_since
                if clock() - forgotten_since >= FORGOTTEN_GRACE:
                    raise JobEndedError(self.job_id, Phase.ENDED.value,
                                        f"Slurm has no record of job {self.job_id} (for {FORGOTTEN_GRACE:g} s) and "
                                        "the job directory holds no final state: it ended without saying why")
            else:
                forgotten_since = None
            if deadline is not None and clock() >= deadline:
                raise WaitTimeoutError(f"job {self.job_id} not ready after {timeout:g} s; last seen: {summary}")
            pause = interval if deadline is None else max(0.0, min(interval, deadline - clock()))
            sleep(pause)

    # ----- using the server
    @property
    def endpoint(self) -> Endpoint:
        """The current run's endpoint, only while the job serves.

        Raises :class:`JobFailedError` / :class:`JobEndedError` once the job is over, and
        :class:`EndpointNotReadyError` before this run published one.
        """
        st = self._last if self._last is not None and time.time() - self._last.checked_at < 2.0 else self.status()
        if st.final:
            raise _over_error(self.job_id, st, what="has no endpoint: it")
        run = self._run(st)
        ep = self.jobdir.read_endpoint(run) if run is not None else None
        if ep is None or not st.phase.serving:
            raise EndpointNotReadyError(f"job {self.job_id} has no endpoint yet (last seen: {st.summary()}); "
                                        f"wait for it first (slurm-vllm wait {self.job_id})")
        return Endpoint(
            base_url=ep.base_url,
            model=ep.model,
            api_key=self.jobdir.read_secret(self.jobdir.api_key),
            host=ep.host,
            port=ep.port,
        )

    def _run(self, st: JobStatus) -> Run | None:
        return Run(self.job_id, st.restart) if self.job_id else None

    def metrics(self, interval: float = 1.0) -> Any:
        """The server's load now (:class:`~slurm_vllm.metrics.JobMetrics`): every replica's
        running and waiting requests, KV-cache use, tokens/s, and the router's counters."""
        from slurm_vllm.metrics import read_metrics  # noqa: PLC0415

        ep = self.endpoint  # raises unless the job serves
        st = self._last
        listed = [(int(r["index"]), str(r["url"])) for r in (st.replicas if st else []) if r.get("url")]
        if listed:
            return read_metrics(listed, ep.api_key, router_url=ep.base_url, interval=interval)
        return read_metrics([(0, ep.base_url)], ep.api_key, interval=interval)

    def openai_client(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this job's server that ignores proxy variables
    (``openai`` is imported only here)."""
        import openai  # noqa: PLC0415 - heavy; only when asked for

        ep = self.endpoint
        kwargs.setdefault("base_url", ep.base_url)
        kwargs.setdefault("api_key", ep.api_key or "EMPTY")
        # The key goes straight to the node, never through a proxy from the environment.
        kwargs.setdefault("http_client", direct_http.openai_http_client(openai))
        return openai.OpenAI(**kwargs)

    # ----- logs
    def log_path(self, node: int | str | None = None, attempt: int | None = None) -> Path:
        """Path of a log: node N's (default: the head, node 0), ``"vllm"`` or ``"batch"``.

        ``attempt`` picks the run of a requeued job (0 the first); default the latest.
        """
        restart = self.jobdir.attempts[-1] if attempt is None else attempt
        if node is None:
            node = 0
        if isinstance(node, int) or str(node).isdigit():
            return self.jobdir.node_log(int(node), restart)
        if node == "vllm":
            return self.jobdir.vllm_log(restart)
        if node == "batch":
            batch = sorted(self.jobdir.logs.glob("batch-*"))
            return batch[-1] if batch else self.jobdir.logs / f"batch-{self.job_id}.out"
        raise ValueError(f"node={node!r}: give a node number, 'vllm' or 'batch'")

    def logs(self, node: int | str | None = None, tail: int | None = None, attempt: int | None = None) -> str:
        """Text of one log (see :meth:`log_path`); empty if it does not exist yet."""
        path = self.log_path(node, attempt)
        if tail:
            return tail_lines(path, tail)
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
        """No Slurm call (a repr must be cheap): the id, the directory and the last status seen."""
        if self._last is None:
            return f"<Job {self.job_id} {self.jobdir.path}>"
        age = max(0.0, time.time() - self._last.checked_at)
        return f"<Job {self.job_id} {self.jobdir.path}, {self._last.summary()} ({age:.0f} s ago)>"

    def _fresh_status(self) -> tuple[JobStatus | None, str]:
        """The status now for a display, and why it is missing; never raises. A status from the
        last second is reused, so the text and HTML forms of one display ask Slurm once."""
        if self._last is not None and time.time() - self._last.checked_at < DISPLAY_REUSE_S:
            return self._last, ""
        try:
            return self.status(), ""
        except SlurmVllmError as exc:
            what = "Slurm unreachable" if isinstance(exc, SlurmCommandError) else "status unavailable"
            return None, f"{what}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a notebook's display must never raise
            return None, f"status unavailable: {type(exc).__name__}: {exc}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython's text display: fresh on every display, one line."""
        st, why = self._fresh_status()
        if st is None:
            p.text(f"<Job {self.job_id} {self.jobdir.path}: {why}>")
        else:
            p.text(f"<Job {self.job_id} {self.jobdir.path}: {st.summary()}>")

    def _repr_html_(self) -> str:
        """A notebook's display: asks for the status each time it is shown; never raises."""
        st, why = self._fresh_status()
        esc = html.escape
        if st is None:
            last = f"<br>last seen: {esc(self._last.summary())}" if self._last is not None else ""
            return (f"<table><caption>slurm_vllm job {esc(str(self.job_id))}</caption><tr><td>"
                    f"{esc(why)}{last}<br>job dir: {esc(str(self.jobdir.path))}</td></tr></table>")
        rows = [
            ("job id", st.job_id or "?"),
            ("phase", st.summary()),
            ("nodes", f"{st.nodes_joined or 0}/{st.nodes_expected}" if st.nodes_expected else ""),
            ("model", st.model or ""),
            ("Slurm state", st.slurm_state),
            ("elapsed", st.elapsed),
            ("job dir", st.job_dir),
            ("checked", time.strftime("%H:%M:%S", time.localtime(st.checked_at))),
        ]
        body = "".join(
            f"<tr><th style='text-align:left'>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows if v
        )
        if st.log_tail:
            body += f"<tr><th style='text-align:left'>log</th><td><pre>{esc(st.log_tail)}</pre></td></tr>"
        return f"<table><caption>slurm_vllm job</caption>{body}</table>"


def _over_error(job_id: str | None, st: JobStatus, what: str = "") -> JobFailedError:
    """The error for a job that is over: :class:`JobEndedError` if it ENDED, else JobFailedError."""
    cls = JobEndedError if st.phase is Phase.ENDED else JobFailedError
    reason = st.reason or "ended before it was ready"
    return cls(job_id, st.phase.value, f"{what} {reason}".strip() if what else reason, st.log_tail)


def status_of(job: Job, sjob: slurm.SlurmJob | None) -> JobStatus:
    """One job's status from Slurm's record of it (already fetched) and its job directory."""
    jd = job.jobdir
    return combine(job.job_id, jd, sjob, StateRecord.read(jd.state), EndpointRecord.read(jd.endpoint),
                   jd.read_secret(jd.api_key))


def statuses(jobs: list[Job], poller: slurm.Poller | None = None) -> list[JobStatus]:
    """Status of many jobs with one Slurm round trip for all of them."""
    poller = poller or slurm.POLLER
    ids = [j.job_id for j in jobs if j.job_id]
    infos = poller.get(ids) if ids else {}
    out = []
    for j in jobs:
        j._last = status_of(j, infos.get(j.job_id) if j.job_id else None)
        out.append(j._last)
    return out
