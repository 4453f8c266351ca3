"""The head's part of the timeline (:mod:`slurm_vllm.timeline`) that needs more than a clock:
Slurm's submit and start times, asked once per run beside the critical path, and the first
completion, probed once the endpoint answers and before READY.

The completion probe proves what ``/health`` cannot: that a request gets a token back. It never
fails the job: a model that serves no completions (an embedding model) or a slow first request
only leaves a failed mark on the timeline, and READY follows as before.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from slurm_vllm import direct_http, slurm
from slurm_vllm.errors import SlurmVllmError
from slurm_vllm.jobdir import JobDir, Mark, Run, add_marks
from slurm_vllm.timeline import FIRST_COMPLETION, STARTED, SUBMITTED, record

#: Seconds the head's question to Slurm may take (it runs beside the Ray start, not before it).
SLURM_TIMEOUT = 15.0
#: Seconds the first completion may take before it counts as failed (READY is written then).
FIRST_COMPLETION_TIMEOUT = 60.0
#: What the probe asks for: one token, deterministic, from any completion model.
PROBE_REQUEST = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}


def ask_slurm_times(jobdir: JobDir, run: Run, log: Callable[[str], None],
                    job_times: Callable[..., slurm.JobTimes] = slurm.job_times) -> threading.Thread:
    """Record Slurm's ``submitted``/``started`` for this run from a helper thread (started here).

    The head does not wait for it: a busy controller must not slow the Ray start down.
    """
    def work() -> None:
        try:
            times = job_times(run.job_id, timeout=SLURM_TIMEOUT)
        except SlurmVllmError as exc:
            log(f"timeline: Slurm's submit and start times are unknown ({str(exc).splitlines()[0][:160]})")
            return
        marks = [Mark(name=name, at=at) for name, at in ((SUBMITTED, times.submitted), (STARTED, times.started))
                 if at is not None]
        try:
            if marks and add_marks(jobdir, run, *marks) is not None and times.queue_wait is not None:
                log(f"timeline: queued {times.queue_wait:.0f}s before Slurm started the job")
        except OSError as exc:
            log(f"timeline: could not record Slurm's times: {exc}")

    thread = threading.Thread(target=work, name="slurm-times", daemon=True)
    thread.start()
    return thread


def _error_text(body: bytes) -> str:
    """vLLM's own error message from an error response, cut short ("" when there is none)."""
    try:
        obj: Any = json.loads(body or b"{}")
    except ValueError:
        return ""
    err = obj.get("error") if isinstance(obj, dict) else None
    message = err.get("message") if isinstance(err, dict) else (err if isinstance(err, str) else obj.get("message"))
    return str(message or "")[:160]


def probe_completion(base: str, api_key: str | None, model: str,
                     timeout: float = FIRST_COMPLETION_TIMEOUT) -> tuple[bool, str]:
    """Ask ``/v1/completions`` for one token, directly (never through a proxy): (ok, why not)."""
    try:
        status, body = direct_http.post(f"{base}/v1/completions", {"model": model, **PROBE_REQUEST},
                                             api_key, timeout)
    except OSError as exc:
        return False, f"no answer ({getattr(exc, 'reason', exc)})"
    if status != 200:
        message = _error_text(body)
        return False, f"HTTP {status}" + (f": {message}" if message else "")
    try:
        choices = json.loads(body).get("choices")
    except (ValueError, AttributeError):
        return False, "the answer is not a completion"
    return (True, "") if choices else (False, "the answer holds no choice")


def first_completion(jobdir: JobDir, run: Run, base: str, api_key: str | None, model: str, *,
                     stop_event: threading.Event, alive: Callable[[], bool], log: Callable[[str], None],
                     timeout: float = FIRST_COMPLETION_TIMEOUT,
                     probe: Callable[[str, str | None, str, float], tuple[bool, str]] = probe_completion) -> bool:
    """Probe the first completion and record it; True when a token came back.

    The request runs in a helper thread so that a stop (scancel, time limit) or vLLM's exit is
    acted on at once rather than after the probe's timeout; then no mark is recorded.
    """
    result: list[tuple[bool, str]] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(probe(base, api_key, model, timeout)),
                              name="first-completion", daemon=True)
    thread.start()
    while thread.is_alive():
        if stop_event.wait(0.1) or not alive():
            return False
    ok, why = result[0] if result else (False, "the probe ended without an answer")
    took = time.monotonic() - started
    record(jobdir, run, FIRST_COMPLETION, detail="" if ok else why, ok=ok, log=log)
    log(f"first completion answered in {took:.1f}s" if ok else
        f"first completion failed after {took:.1f}s ({why}); serving anyway")
    return ok
