"""The run's timeline: where the minutes between ``submit`` and READY go.

The head records, on the node side, the moment each step of a run began (marks in
``state.json``, next to the phase times); Slurm's submit and start times give the queue wait.
This module names those moments, puts them in order, and turns them into durations (one line
for ``status`` and ``wait``) and a table (``slurm-vllm timeline``). It reads records only: a
moment that only vLLM's log could tell is never guessed from log text.

The node side records, in this order:

====================  ===========================================================================
``submitted``         Slurm's SubmitTime (asked once by the head as the run starts)
``started``           Slurm's StartTime: the nodes were allocated
``allocated``         the node program started on the head (after the batch script's set-up)
``preflight``         every node's pre-flight checks passed (``ok`` false: they failed)
``ray_head``          the head's Ray GCS answers
``joined`` ``k/N``    k nodes were alive in the Ray cluster for the first time
``vllm_started``      ``vllm serve`` started: weights loading, compilation, warm-up
``engine_ready``      ``/health`` and ``/v1/models`` answered for the first time
``first_completion``  a one-token completion answered (``ok`` false: it failed, the job went on)
``READY`` etc.        the phases (``phase_times``): READY, DEGRADED, ENDED, FAILED
====================  ===========================================================================
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from slurm_vllm.jobdir import JobDir, Mark, Phase, Run, StateRecord, add_marks

if TYPE_CHECKING:
    from rich.table import Table

SUBMITTED = "submitted"
STARTED = "started"
ALLOCATED = "allocated"
PREFLIGHT = "preflight"
STAGING = "staging"  # stage_weights: the head began copying the model to its own storage
STAGED = "staged"
RAY_HEAD = "ray_head"
JOINED = "joined"
VLLM_STARTED = "vllm_started"
ENGINE_READY = "engine_ready"
FIRST_COMPLETION = "first_completion"

#: The usual order of the moments of a run (it breaks ties in time).
ORDER = (SUBMITTED, STARTED, ALLOCATED, PREFLIGHT, STAGING, STAGED, RAY_HEAD, JOINED, VLLM_STARTED, ENGINE_READY,
         FIRST_COMPLETION,
         Phase.READY.value, Phase.DEGRADED.value, Phase.ENDED.value, Phase.FAILED.value)

LABELS = {
    SUBMITTED: "submitted (Slurm)",
    STARTED: "nodes allocated (Slurm)",
    ALLOCATED: "node program started",
    PREFLIGHT: "pre-flight checks",
    STAGING: "staging weights",
    STAGED: "weights staged",
    RAY_HEAD: "Ray head up",
    JOINED: "nodes joined",
    VLLM_STARTED: "vLLM started: loading weights",
    ENGINE_READY: "engine ready: /health answers",
    FIRST_COMPLETION: "first completion",
}

#: Phases shown on the timeline (STARTING_RAY and LOADING_MODEL are the marks above).
SHOWN_PHASES = (Phase.READY, Phase.DEGRADED, Phase.ENDED, Phase.FAILED)


@dataclass(frozen=True)
class Moment:
    """One row of the timeline: what happened, when (epoch seconds), and whether it went well."""

    name: str
    at: float
    detail: str = ""
    ok: bool = True

    @property
    def label(self) -> str:
        text = LABELS.get(self.name, self.name)
        if self.name == JOINED:
            return f"nodes {self.detail} joined" if self.detail else text
        if not self.ok:
            return f"{text} failed" + (f": {self.detail}" if self.detail else "")
        return f"{text} ({self.detail})" if self.detail and self.name != FIRST_COMPLETION else text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


#: Moments on the Slurm controller's clock; every other one is on the head node's.
SLURM_CLOCK = (SUBMITTED, STARTED)


def _rank(m: Moment) -> tuple[int, float, int]:
    """Slurm's moments first (another machine's clock may run a little ahead), then the head's
    in time order (the pre-flight's verdict may come while Ray forms); ORDER breaks ties."""
    index = ORDER.index(m.name) if m.name in ORDER else len(ORDER)
    return (0, 0.0, index) if m.name in SLURM_CLOCK else (1, m.at, index)


def build(state: StateRecord | None, slurm_times: Mapping[str, float | None] | None = None) -> list[Moment]:
    """The moments of one run, in order: the head's marks, its phase times, and Slurm's
    ``submitted``/``started`` (``slurm_times``) where the head could not record them."""
    moments: dict[tuple[str, str], Moment] = {}
    if state is not None:
        for mark in state.timeline:
            moments.setdefault(mark.key, Moment(mark.name, mark.at, mark.detail, mark.ok))
        for phase in SHOWN_PHASES:
            at = state.phase_times.get(phase.value)
            if at is not None:
                moments.setdefault((phase.value, ""), Moment(phase.value, at))
    for name, at in (slurm_times or {}).items():
        if at is not None:
            moments.setdefault((name, ""), Moment(name, at))
    return sorted(moments.values(), key=_rank)


def from_dicts(items: Iterable[Mapping[str, Any]]) -> list[Moment]:
    """Moments back from their JSON form (``JobStatus.timeline``)."""
    out = []
    for d in items:
        try:
            out.append(Moment(str(d["name"]), float(d["at"]), str(d.get("detail", "")), bool(d.get("ok", True))))
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(out, key=_rank)


def merge(moments: list[Moment], extra: Mapping[str, float | None]) -> list[Moment]:
    """``moments`` plus those of ``extra`` (name -> time) they lack, in order."""
    have = {m.name for m in moments}
    added = [Moment(name, at) for name, at in extra.items() if at is not None and name not in have]
    return sorted([*moments, *added], key=_rank)


def _first(moments: Iterable[Moment], name: str) -> Moment | None:
    return next((m for m in moments if m.name == name), None)


def _all_joined(moments: list[Moment]) -> Moment | None:
    """The moment every node had joined (``N/N``)."""
    for m in moments:
        k, _, n = m.detail.partition("/")
        if m.name == JOINED and k and k == n:
            return m
    return None


def durations(moments: list[Moment]) -> dict[str, float]:
    """How long each stretch took, in seconds, for the stretches whose both ends are known.

    ``queued`` (submit to start), ``setup`` (start to the node program: batch script, modules,
    container, srun), ``staging`` (the head's copy of the weights, with ``stage_weights``),
    ``ray`` (node program, or the end of staging, to every node joined), ``loading`` (vLLM started to
    engine ready: weights, compilation, warm-up), ``first_completion`` (engine ready to the
    first token), ``total`` (submit, or start, to READY). A stretch a clock skew would make
    negative counts as 0.
    """
    get = {name: _first(moments, name) for name in ORDER}
    stretches = (
        ("queued", get[SUBMITTED], get[STARTED]),
        ("setup", get[STARTED], get[ALLOCATED]),
        ("staging", get[STAGING], get[STAGED]),
        ("ray", get[STAGED] or get[ALLOCATED], _all_joined(moments)),
        ("loading", get[VLLM_STARTED], get[ENGINE_READY]),
        ("first_completion", get[ENGINE_READY], get[FIRST_COMPLETION]),
        ("total", get[SUBMITTED] or get[STARTED] or get[ALLOCATED], get[Phase.READY.value]),
    )
    return {name: round(max(0.0, end.at - start.at), 2) for name, start, end in stretches
            if start is not None and end is not None}


def seconds_text(seconds: float) -> str:
    """``0.4s``, ``12s``, ``2m03s``, ``1h05m``: short enough for one status line."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


#: How the stretches are named on one line.
SHORT = {"queued": "queued", "setup": "setup", "staging": "staging", "ray": "Ray", "loading": "loading",
         "first_completion": "first token", "total": "total"}


def one_line(spans: Mapping[str, float]) -> str:
    """``queued 12s, setup 4.1s, Ray 6.0s, loading 1m35s, first token 0.4s; total 2m03s`` ("" if none)."""
    parts = [f"{SHORT[k]} {seconds_text(v)}" for k, v in spans.items() if k != "total" and k in SHORT]
    text = ", ".join(parts)
    if "total" in spans:
        text += ("; " if text else "") + f"total {seconds_text(spans['total'])}"
    return text


def rows(moments: list[Moment]) -> list[tuple[str, str, str, str]]:
    """The table's rows: (moment, clock time, time since the first moment, time since the row before)."""
    out = []
    start = moments[0].at if moments else 0.0
    previous: float | None = None
    for m in moments:
        clock = time.strftime("%H:%M:%S", time.localtime(m.at))
        step = "" if previous is None else seconds_text(max(0.0, m.at - previous))
        out.append((m.label, clock, "+" + seconds_text(max(0.0, m.at - start)), step))
        previous = m.at
    return out


def table(moments: list[Moment], title: str = "") -> Table:
    """The timeline as a rich table (rich is imported only here)."""
    from rich.table import Table  # noqa: PLC0415 - only for the timeline command

    t = Table(title=title or None, title_justify="left")
    t.add_column("moment")
    t.add_column("time", justify="right")
    t.add_column("since start", justify="right")
    t.add_column("since previous", justify="right")
    for row in rows(moments):
        t.add_row(*row)
    return t


def render_table(moments: list[Moment], title: str = "", width: int = 100) -> str:
    """The table as plain text (no colour codes), for tests and pipes."""
    from rich.console import Console  # noqa: PLC0415

    out = io.StringIO()
    Console(width=width, no_color=True, color_system=None, force_terminal=False, file=out).print(table(moments, title))
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Recording (the head)
# --------------------------------------------------------------------------------------------


def record(jobdir: JobDir, run: Run, name: str, detail: str = "", ok: bool = True, at: float | None = None,
           log: Callable[[str], None] | None = None) -> None:
    """Add one moment to the run's timeline. A mark is never worth failing the job for: a write
    error is logged and dropped."""
    try:
        add_marks(jobdir, run, Mark(name=name, at=time.time() if at is None else at, detail=detail, ok=ok))
    except OSError as exc:
        if log is not None:
            log(f"could not record {name} on the timeline: {exc}")


def joined_marks(k: int, n: int, at: float | None = None) -> list[Mark]:
    """``joined 1/N`` .. ``joined k/N``: a count reached by a jump counts as reached then (the
    earlier ones keep their own time: a mark is recorded the first time only)."""
    now = time.time() if at is None else at
    return [Mark(name=JOINED, at=now, detail=f"{i}/{n}") for i in range(1, k + 1)]
