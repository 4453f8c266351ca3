"""One replica of a job with replicas: its node runs ``vllm serve`` and restarts it in place.

With ``replicas: R`` every node serves one copy of the model on its own (no Ray: one node
needs none) and reports it in ``replica-<i>.json`` (:class:`~slurm_vllm.jobdir.ReplicaRecord`):
``starting``, ``ready`` once its ``/health`` and ``/v1/models`` answer, ``restarting`` after
its vLLM exited, ``failed`` when no restart is left, ``ended`` on a stop. Rank 0 reads these
records to steer the router (node/router.py); a replica never ends the job itself: while any
other replica serves, the job goes on DEGRADED. A node whose replica failed for good stays in
the job, idle, until the job ends, so that Slurm does not end the other nodes with it.
"""

from __future__ import annotations

import os
import threading
import time

from slurm_vllm.jobdir import ReplicaPhase, ReplicaRecord
from slurm_vllm.node import serve
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import TIME_LIMIT, slurm_kill_wait, stop
from slurm_vllm.vllm_args import SCALE_OUT_FLAG, installed_vllm, vllm_executable

#: Seconds before the first restart; doubled per restart, at most BACKOFF_MAX.
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 60.0


def backoff(restart: int) -> float:
    """The wait before restart number ``restart`` (1, 2, ...): 5 s, 10 s, 20 s, ... 60 s."""
    return float(min(BACKOFF_FIRST * 2.0 ** max(restart - 1, 0), BACKOFF_MAX))


def replica_index(ctx: NodeContext) -> int:
    """This node's replica: nodes are split into consecutive groups of nodes / replicas."""
    return ctx.rank // ctx.spec.nodes_per_replica


class Reporter:
    """Writes this node's replica record; every write carries the run and the restart count."""

    def __init__(self, ctx: NodeContext, index: int, url: str) -> None:
        self.ctx, self.index, self.url = ctx, index, url
        self.restarts = 0

    def __call__(self, phase: ReplicaPhase, reason: str = "", log_tail: str = "") -> None:
        ctx = self.ctx
        ReplicaRecord(job_id=ctx.run.job_id, restart=ctx.run.restart or 0, index=self.index,
                      nodes=[ctx.topology.hostname], url=self.url, phase=phase, restarts=self.restarts,
                      reason=reason, log_tail=log_tail, updated_at=time.time()).write(ctx.jobdir.replica(self.index))


def serve_replica(ctx: NodeContext) -> None:
    """Serve this node's replica until the node stops, restarting its vLLM when it exits.

    Returns when the node is told to stop (the replica is then ``ended``, after a drain on the
    time-limit warning) or when the restarts are spent (``failed``).
    """
    index = replica_index(ctx)
    port = serve.free_api_port(ctx)
    key = serve.job_api_key(ctx)
    base = f"http://{ctx.ip}:{port}"
    report = Reporter(ctx, index, base + "/v1")
    log_path = ctx.jobdir.vllm_log(ctx.run.restart or 0, ctx.rank)
    # The router's own (cache-aware) policy tokenizes through the replicas' render endpoints.
    scale_out = [SCALE_OUT_FLAG] if installed_vllm(tuple(vllm_executable(ctx.env or None))).has_scale_out else []
    argv = serve.serve_argv(ctx, host=ctx.ip, port=port, backend="local", shutdown_timeout=None,
                            extra_flags=scale_out)
    env = serve.serve_env(os.environ, ctx.env, api_key=key)
    grace = serve.stop_grace(slurm_kill_wait())
    limit = ctx.spec.serve.replica_restarts
    while True:
        if report.restarts == 0:
            report("starting")  # a restart stays "restarting", with its reason, until ready
        started = time.monotonic()
        proc = serve.launch(argv, env, log_path)
        try:
            outcome = serve.wait_ready(proc, base, key, ctx.stop_event, float(ctx.spec.serve.ready_timeout))
            during = "while loading the model"
            if outcome.kind == "ready":
                report("ready")
                ctx.log(f"replica {index} ready at {base}/v1 after {time.monotonic() - started:.0f} s"
                        + (f" (restart {report.restarts})" if report.restarts else ""))
                outcome = serve.supervise(proc, ctx.stop_event)
                during = "while serving"
            if outcome.kind == "exited" and ctx.stopper.signalled_soon():
                outcome = serve.Outcome("stopped")  # scancel reached vLLM a moment first
            if outcome.kind == "stopped":
                if during == "while serving" and ctx.stop_reason == TIME_LIMIT:
                    budget = serve.drain_budget(ctx.spec.resources.signal_grace)
                    ctx.log(f"replica {index}: time-limit warning: draining in-flight requests (up to {budget:.0f} s)")
                    serve.drain_then_stop(proc, base, key, budget)
                else:
                    stop(proc, grace)
                report("ended", reason=ctx.stop_reason or "stopped")
                return
            if outcome.kind == "timeout":
                stop(proc, serve.STOP_GRACE)
                reason = f"vllm was not ready after {ctx.spec.serve.ready_timeout:.0f} s"
            else:
                stop(proc, 5.0)
                reason = serve.exit_reason(outcome.returncode, during)
            summary = serve.error_summary(serve.log_tail(log_path, serve.SUMMARY_LINES))
            reason = f"replica {index} on {ctx.topology.hostname}: {reason}" + (f": {summary}" if summary else "")
        finally:
            if proc.poll() is None:
                stop(proc, serve.STOP_GRACE)
        ctx.log(reason)
        if report.restarts >= limit:
            report("failed", reason=reason + (f" (after {limit} restart(s))" if limit else ""),
                   log_tail=serve.log_tail(log_path))
            return
        report.restarts += 1
        wait = backoff(report.restarts)
        report("restarting", reason=reason)
        ctx.log(f"replica {index}: restart {report.restarts}/{limit} in {wait:.0f} s")
        if ctx.stop_event.wait(wait):
            report("ended", reason=ctx.stop_reason or "stopped")
            return


def run_replica_node(ctx: NodeContext) -> int:
    """A node other than rank 0: serve its replica, then stay until the job ends (exit 0).

    Exiting early, even cleanly, would not help anyone: the node is allocated until the job ends.
    Staying also keeps ``srun --kill-on-bad-exit`` from ending the replicas that still serve.
    """
    serve_logged(ctx)
    while not ctx.stop_event.wait(2.0):
        state = ctx.jobdir.read_state(ctx.run)
        if state is not None and state.phase.final:
            break
    return 0


def start_replica_thread(ctx: NodeContext) -> threading.Thread:
    """Rank 0 serves its own replica beside the router (the router runs in the main thread)."""
    thread = threading.Thread(target=serve_logged, args=(ctx,), name="replica-0", daemon=True)
    thread.start()
    return thread


def serve_logged(ctx: NodeContext) -> None:
    """:func:`serve_replica`, with any error recorded as the replica's failure, not the node's."""
    try:
        serve_replica(ctx)
    except Exception as exc:  # noqa: BLE001 - a replica's failure must be recorded, not lost in a thread
        reason = f"replica {replica_index(ctx)} on {ctx.topology.hostname}: {type(exc).__name__}: {exc}"
        ctx.log(reason)
        Reporter(ctx, replica_index(ctx), "")("failed", reason=reason)
