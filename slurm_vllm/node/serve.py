"""The final step on the nodes: run ``vllm serve``, measure readiness, publish the endpoint.

The head builds the ``vllm serve`` command from the spec, starts it in a process group of its
own (so stopping it stops every process vLLM spawned), and polls ``/health`` and
``/v1/models`` on the head's own address until both answer. Only then is ``endpoint.json``
written (atomically, 0600) and the phase set to READY: readiness is measured, never guessed
from log text. If vLLM exits, the job ends FAILED with the exit code and the last lines of
vLLM's log; if the node program is told to stop (scancel, time-limit warning), vLLM gets
SIGTERM, a bounded wait, then SIGKILL, and the job ends ENDED.

The API key reaches vLLM through the ``VLLM_API_KEY`` environment variable, never through the
command line, so it does not show in ``ps``, in logs or in the batch script.

Two backends share this machinery:

* ``ray`` (default): the node program has formed a Ray cluster; the head runs
  ``vllm serve ... --distributed-executor-backend ray`` with ``RAY_ADDRESS`` set, and vLLM
  places its workers on the raylets (:func:`run_head_serving`).
* ``mp``: vLLM's own multi-node mode; every node runs ``vllm serve ... --nnodes N --node-rank R
  --master-addr HEAD --master-port P``, ranks other than 0 with ``--headless``
  (:func:`run_mp_node`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from slurm_vllm import direct_http, timeline
from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import EndpointRecord, HeadRecord, JobDir, Phase, Run, plain, tail_lines, write_state
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import TEARDOWN_GRACE, TIME_LIMIT, OwnedProcess, slurm_kill_wait, stop
from slurm_vllm.node.moments import first_completion
from slurm_vllm.node.ports import port_is_free
from slurm_vllm.node.warm import load_strategy_for
from slurm_vllm.vllm_args import build_serve_argv, vllm_drains_on_sigterm, vllm_executable

#: How many lines of vLLM's log go into state.json when it fails.
LOG_TAIL_LINES = 30
#: Default time allowed for loading before the job gives up (large models load for a long time).
DEFAULT_READY_TIMEOUT = 3600.0
#: Seconds vLLM gets after SIGTERM before its process group is killed (at most; see stop_grace).
STOP_GRACE = 30.0
#: What the node program needs after vLLM has stopped: Ray's teardown and a margin.
TEARDOWN_BUDGET = TEARDOWN_GRACE + 0.5
MIN_STOP_GRACE = 1.0
POLL_INTERVAL = 2.0


# --------------------------------------------------------------------------- command line


#: Seconds kept back from the time-limit warning's lead time for Ray's teardown and the state.
DRAIN_MARGIN = 10.0


def drain_budget(signal_grace: float) -> float:
    """How long in-flight requests may run on after the time-limit warning (SIGUSR2 arrives
    ``signal_grace`` seconds before the end): the lead time, less the teardown and a margin."""
    return max(MIN_STOP_GRACE, signal_grace - DRAIN_MARGIN - TEARDOWN_BUDGET)


def serve_env(
    base: Mapping[str, str],
    extra: Mapping[str, str],
    *,
    api_key: str | None,
    ray_address: str | None = None,
) -> dict[str, str]:
    """vLLM's environment: the node's, the node program's additions, the key, Ray's address."""
    env = dict(base)
    env.update(extra)
    env.pop("VLLM_API_KEY", None)  # only the job's own key, never one leaked from a shell
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


# --------------------------------------------------------------------------- processes


def launch(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> OwnedProcess:
    """Start ``argv`` as an owned process (own process group, dies with the node program),
    output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"--- slurm_vllm: starting {' '.join(argv)}\n".encode())
        log.flush()
        return OwnedProcess("vllm", argv, env, stdout=log)


def requests_in_flight(base: str, api_key: str | None) -> int | None:
    """Requests vLLM is running or holding (its ``/metrics``, read with prometheus_client, which
    comes with vLLM); None when it does not answer or cannot be read."""
    try:
        from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415 - vLLM's
    except ImportError:
        return None
    try:
        status, body = direct_http.get(f"{base}/metrics", api_key, timeout=5.0)
    except OSError:
        return None
    if status != 200:
        return None
    total = 0.0
    try:
        for family in text_string_to_metric_families(body.decode(errors="replace")):
            if family.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                total += sum(sample.value for sample in family.samples if sample.name == family.name)
    except ValueError:
        return None
    return int(total)


def drain_then_stop(proc: OwnedProcess, base: str, api_key: str | None, budget: float,
                    poll: float = 1.0) -> bool:
    """Let the requests in flight finish (up to ``budget`` seconds, watched on ``/metrics``),
    then stop vLLM: SIGTERM to its API server alone, which shuts its engine down in its own
    order, and whatever is left a moment later.

    Not vLLM's own drain on SIGTERM (``--shutdown-timeout``) alone: with the Ray executor, Ray's
    driver handler in vLLM's engine turns SIGTERM into an immediate exit, and the requests in
    flight would be cut. True when nothing was in flight any more when vLLM was stopped.
    """
    deadline = time.monotonic() + budget
    drained = False
    while proc.poll() is None and time.monotonic() < deadline:
        if requests_in_flight(base, api_key) == 0:
            drained = True
            break
        time.sleep(poll)
    if proc.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=max(MIN_STOP_GRACE, min(10.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
    stop(proc, MIN_STOP_GRACE)
    return drained


def stop_grace(kill_wait: float | None) -> float:
    """vLLM's grace on a stop: STOP_GRACE, but inside Slurm's KillWait.

    After scancel or the time limit Slurm SIGKILLs the whole step KillWait seconds after its
    SIGTERM, and the node program still has Ray to stop after vLLM. A grace longer than what is
    left would only let Slurm's SIGKILL cut both short.
    """
    if kill_wait is None:
        return STOP_GRACE
    return max(MIN_STOP_GRACE, min(STOP_GRACE, kill_wait - TEARDOWN_BUDGET))


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of vLLM's log ('' when it does not exist)."""
    return tail_lines(path, lines, max_bytes=256 * 1024)


def exit_reason(returncode: int | None, during: str) -> str:
    """A sentence for state.json: how vLLM ended, in words a user can act on."""
    if returncode is None:
        return f"vllm did not exit {during}"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"vllm was killed by {name} {during}"
    return f"vllm exited with code {returncode} {during}"


#: A Python exception line ("ValueError: ...", "ray.exceptions.RayTaskError(KeyError): ...").
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b(?:\([^)]*\))?: \S")
#: vLLM's log prefixes: "(EngineCore pid=12) ", "ERROR 11-29 09:41:39 [core.py:1510] ", colours.
_LOG_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?(?:\([^)]*\)(?:\x1b\[[0-9;]*m)?\s+)*"
                         r"(?:(?:ERROR|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s+)?")
_RAY_TASK_ERROR = re.compile(r"^[\w.]*RayTaskError\((\w+)\)")
#: Exceptions that only say "see above": never the cause.
_GENERIC = ("See root cause above", "See stack trace for root cause", "Engine core initialization failed",
            "ActorHandleNotFoundError", "ActorDiedError")


def error_summary(log_text: str) -> str:
    """vLLM's own words for why it failed: the first telling exception line of the failure.

    vLLM reports a failed start several times: the root cause (often in a worker or engine
    process), then wrappers that say "see root cause above". The first exception line that is
    not such a wrapper is the cause; WARNING lines never are. A Ray task error
    (``RayTaskError(RuntimeError): ray::Worker.method() ...``) is followed by the inner
    exception's own line, which is the one quoted when present.
    """
    wrapper = ""
    inner = ""
    for line in log_text.splitlines():
        if "WARNING" in line:
            continue
        text = _LOG_PREFIX.sub("", plain(line.strip()))
        if inner and text.startswith(inner + ":"):
            return text[:400]
        if wrapper or not _EXCEPTION_LINE.match(text) or any(g in text for g in _GENERIC):
            continue
        ray_task = _RAY_TASK_ERROR.match(text)
        if not ray_task:
            return text[:400]
        wrapper, inner = text[:400], ray_task.group(1)
    return wrapper


#: How much of vLLM's log is searched for the cause of a failure (its end: the failure region).
SUMMARY_LINES = 400


# --------------------------------------------------------------------------- readiness


def probe(base: str, api_key: str | None, timeout: float = 5.0) -> str | None:
    """Return the served model id when ``/health`` and ``/v1/models`` both answer, else None."""
    try:
        status, _ = direct_http.get(f"{base}/health", None, timeout)
        if status != 200:
            return None
        status, body = direct_http.get(f"{base}/v1/models", api_key, timeout)
        if status != 200:
            return None
        data = json.loads(body or b"{}").get("data") or []
    except (OSError, ValueError):
        return None
    if not data:
        return None
    return str(data[0].get("id") or "")


@dataclass
class Outcome:
    """How waiting ended: ``ready`` (with the model id), ``exited``, ``stopped``, ``timeout``, or
    ``peer``: another node's part of this vLLM ended (``reason`` says which and how)."""

    kind: str
    model: str | None = None
    returncode: int | None = None
    reason: str = ""


#: Asked while waiting: why another node's part of this vLLM is gone, or None while it runs.
PeerCheck = Callable[[], "str | None"]


def _peer_lost(peer: PeerCheck | None) -> Outcome | None:
    reason = peer() if peer is not None else None
    return Outcome("peer", reason=reason) if reason else None


def wait_ready(
    proc: OwnedProcess,
    base: str,
    api_key: str | None,
    stop_event: threading.Event,
    timeout: float,
    poll: float | None = None,
    peer: PeerCheck | None = None,
) -> Outcome:
    """Poll the endpoint until it answers, vLLM exits, a stop is asked for, ``peer`` names a lost
    part of it, or time runs out."""
    poll = POLL_INTERVAL if poll is None else poll
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            return Outcome("exited", returncode=rc)
        if stop_event.is_set():
            return Outcome("stopped")
        lost = _peer_lost(peer)
        if lost is not None:
            return lost
        model = probe(base, api_key, timeout=min(5.0, max(poll, 1.0)))
        if model is not None:
            return Outcome("ready", model=model)
        if time.monotonic() >= deadline:
            return Outcome("timeout")
        stop_event.wait(poll)


def supervise(proc: OwnedProcess, stop_event: threading.Event, poll: float = 1.0,
              ended: Callable[[], bool] | None = None, peer: PeerCheck | None = None) -> Outcome:
    """Wait while vLLM serves: until it exits, the node program is told to stop, ``ended()``
    says the job is over (a headless rank watching the head's state), or ``peer`` names a lost
    part of it (a replica's other nodes)."""
    while True:
        rc = proc.poll()
        if rc is not None:
            return Outcome("exited", returncode=rc)
        if stop_event.wait(poll) or (ended is not None and ended()):
            return Outcome("stopped")
        lost = _peer_lost(peer)
        if lost is not None:
            return lost


# --------------------------------------------------------------------------- the head's job


def api_port(ctx: NodeContext) -> int:
    """The vLLM API port: the per-job plan's (which honours ``serve.port``)."""
    return ctx.ports.api


def ray_address(ctx: NodeContext) -> str | None:
    """The job's own Ray cluster (``ctx.ray_address``, else ``RAY_ADDRESS`` of the node's env)."""
    return ctx.ray_address or ctx.env.get("RAY_ADDRESS") or None


def job_api_key(ctx: NodeContext) -> str | None:
    if not ctx.spec.serve.api_key:
        return None
    key = ctx.jobdir.read_secret(ctx.jobdir.api_key)
    if key is None:
        raise FileNotFoundError(f"{ctx.jobdir.api_key} is missing; the job was rendered with an API key")
    return key


def _ready_timeout(ctx: NodeContext) -> float:
    return float(ctx.spec.serve.ready_timeout or DEFAULT_READY_TIMEOUT)


def write_endpoint(jobdir: JobDir, run: Run, *, ip: str, port: int, model: str, host: str) -> EndpointRecord:
    """Publish the endpoint (0600: it sits next to the key and names where to use it)."""
    endpoint = EndpointRecord(job_id=run.job_id, restart=run.restart or 0, base_url=f"http://{ip}:{port}/v1",
                              model=model, host=host, port=port)
    endpoint.write(jobdir.endpoint, mode=0o600)
    return endpoint


def _stop_is_failure(ctx: NodeContext) -> bool:
    return ctx.stopper.failed


def _stop_reason(ctx: NodeContext) -> str:
    return ctx.stop_reason or "stopped"


#: When a launch ended, in the words of its reason.
LOADING = "while loading the model"
SERVING = "while serving"


def watch_launch(ctx: NodeContext, proc: OwnedProcess, base: str, api_key: str | None,
                 on_ready: Callable[[str], None], peer: PeerCheck | None = None) -> tuple[Outcome, str]:
    """One launch of vLLM, watched: wait for readiness, call ``on_ready(model)``, then watch it
    serve. Returns how it ended and when (:data:`LOADING` or :data:`SERVING`).

    scancel signals every process of the step at once: a vLLM that exits a moment before the
    node program has registered the stop was stopped, not broken (``stopped``).
    """
    outcome = wait_ready(proc, base, api_key, ctx.stop_event, _ready_timeout(ctx), peer=peer)
    during = LOADING
    if outcome.kind == "ready":
        on_ready(outcome.model or ctx.spec.model.served_name or ctx.spec.model.name)
        outcome = supervise(proc, ctx.stop_event, peer=peer)
        during = SERVING
    if outcome.kind == "exited" and ctx.stopper.signalled_soon():
        outcome = Outcome("stopped", returncode=outcome.returncode)
    return outcome, during


def stop_for(ctx: NodeContext, proc: OwnedProcess, base: str, api_key: str | None, during: str,
             grace: float) -> None:
    """Stop vLLM on a stop: at the time-limit warning while serving, let the requests in flight
    finish first (its lead time, :func:`drain_then_stop`); else a graceful stop."""
    if during == SERVING and ctx.stop_reason == TIME_LIMIT:
        budget = drain_budget(ctx.spec.resources.signal_grace)
        print(f"slurm_vllm: time-limit warning: draining in-flight requests (up to {budget:.0f} s)", flush=True)
        t0 = time.monotonic()
        drained = drain_then_stop(proc, base, api_key, budget)
        print(f"slurm_vllm: {'in-flight requests finished' if drained else 'requests still in flight'} "
              f"after {time.monotonic() - t0:.1f} s; vLLM stopped", flush=True)
    else:
        stop(proc, grace)


def failure_reason(ctx: NodeContext, proc: OwnedProcess, outcome: Outcome, during: str, log_path: Path) -> str:
    """Stop what is left of a failed launch and say why: vLLM's own words where it gave some."""
    if outcome.kind == "peer":
        stop(proc, 5.0)
        return f"{outcome.reason} {during}"
    if outcome.kind == "timeout":
        stop(proc, STOP_GRACE)
        reason = f"vllm was not ready after {_ready_timeout(ctx):.0f} s"
    else:
        stop(proc, 5.0)  # the leader is gone; its children must not stay
        reason = exit_reason(outcome.returncode, during)
    summary = error_summary(log_tail(log_path, SUMMARY_LINES))
    return f"{reason}: {summary}" if summary else reason


def serve_and_watch(
    ctx: NodeContext,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    ip: str,
    port: int,
    api_key: str | None,
    log_path: Path,
) -> int:
    """Start vLLM, wait for readiness, publish it, and watch until it ends; returns an exit code.

    0 when stopped on request (ENDED), 1 when vLLM failed or never became ready (FAILED), so
    ``srun --kill-on-bad-exit`` ends the other nodes.
    """
    jobdir: JobDir = ctx.jobdir
    run: Run = ctx.run
    write_state(jobdir, run, Phase.LOADING_MODEL, reason="", log_tail="")
    started = time.monotonic()
    grace = stop_grace(slurm_kill_wait())
    proc = launch(argv, env, log_path)
    timeline.record(jobdir, run, timeline.VLLM_STARTED, log=ctx.log)
    base = f"http://{ip}:{port}"

    def publish(model: str) -> None:
        timeline.record(jobdir, run, timeline.ENGINE_READY, log=ctx.log)
        first_completion(jobdir, run, base, api_key, model, stop_event=ctx.stop_event,
                         alive=lambda: proc.poll() is None, log=ctx.log)
        write_endpoint(jobdir, run, ip=ip, port=port, model=model, host=ctx.head_host)
        write_state(jobdir, run, Phase.READY, load_seconds=round(time.monotonic() - started, 1))
        print(f"slurm_vllm: vLLM ready at {base}/v1 after {time.monotonic() - started:.0f} s", flush=True)

    try:
        outcome, during = watch_launch(ctx, proc, base, api_key, publish)
        if outcome.kind == "stopped":
            # State first: Slurm's KillWait after scancel may be short, and the reason must land.
            if _stop_is_failure(ctx):  # e.g. a node left the Ray cluster
                write_state(jobdir, run, Phase.FAILED, reason=_stop_reason(ctx), log_tail=log_tail(log_path))
                stop(proc, grace)
                return 1
            # At the time-limit warning the requests in flight finish first, and the other
            # nodes (which end when the state is final) must stay until they have.
            draining = during == SERVING and _stop_reason(ctx) == TIME_LIMIT
            if not draining:
                write_state(jobdir, run, Phase.ENDED, reason=_stop_reason(ctx))
            stop_for(ctx, proc, base, api_key, during, grace)
            if draining:
                write_state(jobdir, run, Phase.ENDED, reason=_stop_reason(ctx))
            return 0
        reason = failure_reason(ctx, proc, outcome, during, log_path)
        tail = log_tail(log_path)
        write_state(jobdir, run, Phase.FAILED, reason=reason, log_tail=tail, exit_code=outcome.returncode)
        print(f"slurm_vllm: {reason}", file=sys.stderr, flush=True)
        return 1
    finally:
        if proc.poll() is None:
            stop(proc, STOP_GRACE)


def _shutdown_timeout(ctx: NodeContext) -> int | None:
    """vLLM's drain on SIGTERM: the time-limit warning's lead time, where vLLM has the option."""
    if not vllm_drains_on_sigterm(vllm_executable(ctx.env or None)):
        return None
    return int(drain_budget(ctx.spec.resources.signal_grace))


def free_port_now(ctx: NodeContext, port: int, what: str) -> int:
    """``port``, tested again right before vLLM binds it (minutes after it was planned)."""
    if not port_is_free(port):
        raise NodeError(f"port {port} ({what} port planned for this job) on {ctx.head_host} was taken by another "
                        "process after it was planned; resubmit, or set serve.port to a free port")
    return port


def free_api_port(ctx: NodeContext) -> int:
    """The API port, tested again right before vLLM binds it."""
    return free_port_now(ctx, api_port(ctx), "the vLLM API")


def serve_argv(ctx: NodeContext, *, host: str, port: int, backend: str, shutdown_timeout: int | None,
               nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
               master_port: int | None = None, extra_flags: Sequence[str] = ()) -> list[str]:
    """This node's ``vllm serve`` argv (the Ray head, each mp node, each replica): the spec's
    model, or this node's staged copy of it (``ctx.model_path``) under the spec's name."""
    model = ctx.model_path or ctx.spec.model.name
    return build_serve_argv(
        ctx.spec, host=host, port=port, backend=backend, nnodes=nnodes, node_rank=node_rank,
        master_addr=master_addr, master_port=master_port, executable=vllm_executable(ctx.env or None),
        shutdown_timeout=shutdown_timeout,
        load_strategy=load_strategy_for(model, ctx.spec.model.extra_args, ctx.env, ctx.log),
        model_path=ctx.model_path, extra_flags=extra_flags)


def run_head_serving(ctx: NodeContext) -> int:
    """Ray backend, on the head after all nodes joined: run vLLM on the cluster until the end."""
    port = free_api_port(ctx)
    key = job_api_key(ctx)
    argv = serve_argv(ctx, host=ctx.head_ip, port=port, backend="ray", shutdown_timeout=_shutdown_timeout(ctx))
    env = serve_env(os.environ, ctx.env, api_key=key, ray_address=ray_address(ctx))
    return serve_and_watch(ctx, argv, env, ip=ctx.head_ip, port=port, api_key=key,
                           log_path=ctx.jobdir.vllm_log(ctx.run.restart or 0))


def mp_log_path(jobdir: JobDir, rank: int, restart: int = 0) -> Path:
    """vLLM's log for one node of the mp backend (rank 0's is the usual ``vllm.log``)."""
    return jobdir.vllm_log(restart, rank)


def master_port(ctx: NodeContext) -> int:
    """vLLM's rendezvous port for the mp backend, from the head's port plan."""
    return ctx.ports.mp_master_port


def wait_head_published(ctx: NodeContext, timeout: float, poll: float = 0.5) -> HeadRecord | None:
    """Read ``head.json`` of this job run, waiting for the head to write it.

    mp ranks other than 0 need the head's address and rendezvous port; each node plans its own
    ports, so only the head knows the one it listens on. None when stopped first; raises
    TimeoutError past ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = ctx.jobdir.read_head(ctx.run)
        if info is not None:
            return info
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the head never published {ctx.jobdir.head} within {timeout:.0f} s")
        if ctx.stop_event.wait(poll):
            return None


def run_mp_node(ctx: NodeContext) -> int:
    """mp backend, on every node: rank 0 serves the API, the others run headless."""
    if ctx.rank == 0:
        addr, mport, port = ctx.head_ip, free_port_now(ctx, master_port(ctx), "vLLM's rendezvous"), free_api_port(ctx)
    else:
        info = wait_head_published(ctx, timeout=float(ctx.spec.ray.join_timeout))
        if info is None:
            return 0
        addr, mport, port = info.ip, info.gcs_port, int(info.api_port or 0)
    key = job_api_key(ctx) if ctx.rank == 0 else None
    argv = serve_argv(ctx, host=addr, port=port, backend="mp", shutdown_timeout=_shutdown_timeout(ctx),
                      nnodes=ctx.num_nodes, node_rank=ctx.rank, master_addr=addr, master_port=mport)
    env = serve_env(os.environ, ctx.env, api_key=key)
    log_path = mp_log_path(ctx.jobdir, ctx.rank, ctx.run.restart or 0)
    if ctx.rank == 0:
        return serve_and_watch(ctx, argv, env, ip=addr, port=port, api_key=key, log_path=log_path)
    # A headless rank serves no API: it runs until vLLM ends, the node program stops it, or the
    # head's state is final (after the time-limit drain, or any end of rank 0).
    grace = stop_grace(slurm_kill_wait())
    proc = launch(argv, env, log_path)

    def head_ended() -> bool:
        state = ctx.jobdir.read_state(ctx.run)
        return state is not None and state.phase.final

    try:
        outcome = supervise(proc, ctx.stop_event, ended=head_ended)
        if outcome.kind == "stopped" or ctx.stopper.signalled_soon():
            stop(proc, grace)
            return 0
        stop(proc, 5.0)
        reason = exit_reason(outcome.returncode, f"on node rank {ctx.rank}")
        summary = error_summary(log_tail(log_path, SUMMARY_LINES))
        print(f"slurm_vllm: {reason}{': ' + summary if summary else ''}", file=sys.stderr, flush=True)
        return 0 if outcome.returncode == 0 else 1
    finally:
        if proc.poll() is None:
            stop(proc, STOP_GRACE)
