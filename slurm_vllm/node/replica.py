"""One replica of a job with replicas: its nodes run ``vllm serve``, restarted in place.

With ``replicas: R`` the nodes are split into R groups of ``nodes / R`` consecutive nodes
(:func:`place`); each group serves one copy of the model, with no Ray: a one-node replica runs
vLLM on its own, a replica of several nodes runs vLLM's own multi-node mode (``--nnodes``), its
first node serving the API and the others ``--headless``.

The replica's first node reports it in ``replica-<i>.json``
(:class:`~slurm_vllm.jobdir.ReplicaRecord`): ``starting``, ``ready`` once its ``/health`` and
``/v1/models`` answer, ``restarting`` after its vLLM exited, ``failed`` when no restart is left,
``ended`` on a stop. Rank 0 reads these records to steer the router (node/router.py); a replica
never ends the job itself: while any other replica serves, the job goes on DEGRADED.

A replica of several nodes is one vLLM: any part of it gone is the whole replica gone. The first
node names the rendezvous of each launch in its record (``master``); the other nodes start their
headless part when it appears and stop it when it goes (:func:`serve_headless`), and report a
part that exited by itself in ``headless-<rank>.json``, on which the first node restarts the
whole replica. A node whose replica failed for good stays in the job, idle, until the job ends,
so that Slurm does not end the other nodes with it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from slurm_vllm.jobdir import HeadlessPhase, HeadlessRecord, ReplicaPhase, ReplicaRecord
from slurm_vllm.node import serve
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import OwnedProcess, slurm_kill_wait, stop
from slurm_vllm.vllm_args import SCALE_OUT_FLAG, installed_vllm, vllm_executable

#: Seconds before the first restart; doubled per restart, at most BACKOFF_MAX.
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 60.0
#: How often a headless node reads its replica's record.
HEADLESS_POLL = 1.0


def backoff(restart: int) -> float:
    """The wait before restart number ``restart`` (1, 2, ...): 5 s, 10 s, 20 s, ... 60 s."""
    return float(min(BACKOFF_FIRST * 2.0 ** max(restart - 1, 0), BACKOFF_MAX))


@dataclass(frozen=True)
class Place:
    """Where one node sits among the replicas."""

    index: int  # its replica
    member: int  # its place in the replica: 0 serves the API, the others run headless
    ranks: tuple[int, ...]  # the replica's nodes, by job rank
    hosts: tuple[str, ...]  # the same nodes, by name

    @property
    def first(self) -> bool:
        return self.member == 0

    @property
    def size(self) -> int:
        return len(self.ranks)


def place(rank: int, nodes_per_replica: int, hosts: tuple[str, ...]) -> Place:
    """Replica ``rank // nodes_per_replica``, on that group of consecutive nodes."""
    index, member = divmod(rank, nodes_per_replica)
    ranks = tuple(range(index * nodes_per_replica, (index + 1) * nodes_per_replica))
    return Place(index=index, member=member, ranks=ranks,
                 hosts=tuple(hosts[r] if r < len(hosts) else f"rank-{r}" for r in ranks))


def place_of(ctx: NodeContext) -> Place:
    return place(ctx.rank, ctx.spec.nodes_per_replica, ctx.topology.hosts)


class Reporter:
    """Writes the replica's record; every write carries the run and the restart count."""

    def __init__(self, ctx: NodeContext, where: Place, url: str) -> None:
        self.ctx, self.where, self.url = ctx, where, url
        self.restarts = 0

    def __call__(self, phase: ReplicaPhase, reason: str = "", log_tail: str = "", master: str = "") -> None:
        ctx = self.ctx
        ReplicaRecord(job_id=ctx.run.job_id, restart=ctx.run.restart or 0, index=self.where.index,
                      nodes=list(self.where.hosts), url=self.url, phase=phase, restarts=self.restarts,
                      reason=reason, log_tail=log_tail, master=master,
                      updated_at=time.time()).write(ctx.jobdir.replica(self.where.index))


def headless_lost(ctx: NodeContext, where: Place, attempt: int) -> str | None:
    """Why a headless part of this launch is gone (its ``exited`` record), or None."""
    for rank in where.ranks[1:]:
        rec = ctx.jobdir.read_headless(rank, ctx.run)
        if rec is not None and rec.attempt == attempt and rec.phase == "exited":
            return rec.reason or f"the headless vLLM on {rec.host} exited"
    return None


def serve_replica(ctx: NodeContext) -> None:
    """On a replica's first node: serve it until the node stops, restarting it when it exits.

    Returns when the node is told to stop (the replica is then ``ended``, after a drain on the
    time-limit warning) or when the restarts are spent (``failed``).
    """
    where = place_of(ctx)
    port = serve.free_api_port(ctx)
    key = serve.job_api_key(ctx)
    base = f"http://{ctx.ip}:{port}"
    report = Reporter(ctx, where, base + "/v1")
    log_path = ctx.jobdir.vllm_log(ctx.run.restart or 0, ctx.rank)
    # The router's own (cache-aware) policy tokenizes through the replicas' render endpoints.
    scale_out = [SCALE_OUT_FLAG] if installed_vllm(tuple(vllm_executable(ctx.env or None))).has_scale_out else []
    if where.size == 1:
        master = ""
        argv = serve.serve_argv(ctx, host=ctx.ip, port=port, backend="local", shutdown_timeout=None,
                                extra_flags=scale_out)
        peer = None
    else:
        mport = serve.free_port_now(ctx, serve.master_port(ctx), "vLLM's rendezvous")
        master = f"{ctx.ip}:{mport}"
        argv = serve.serve_argv(ctx, host=ctx.ip, port=port, backend="mp", shutdown_timeout=None,
                                nnodes=where.size, node_rank=0, master_addr=ctx.ip, master_port=mport,
                                extra_flags=scale_out)

        def peer() -> str | None:
            return headless_lost(ctx, where, report.restarts)
    env = serve.serve_env(os.environ, ctx.env, api_key=key)
    grace = serve.stop_grace(slurm_kill_wait())
    limit = ctx.spec.serve.replica_restarts
    reason = ""
    while True:
        # A restart stays "restarting", with its reason, until ready; ``master`` calls the
        # replica's other nodes to this launch.
        if not report.restarts or master:
            report("restarting" if report.restarts else "starting", reason=reason, master=master)
        started = time.monotonic()
        proc = serve.launch(argv, env, log_path)

        def ready(_model: str, started: float = started) -> None:
            report("ready", master=master)
            ctx.log(f"replica {where.index} ready at {base}/v1 after {time.monotonic() - started:.0f} s"
                    + (f" (restart {report.restarts})" if report.restarts else ""))

        try:
            outcome, during = serve.watch_launch(ctx, proc, base, key, ready, peer=peer)
            if outcome.kind == "stopped":
                serve.stop_for(ctx, proc, base, key, during, grace)
                report("ended", reason=ctx.stop_reason or "stopped")
                return
            reason = f"replica {where.index} on {ctx.topology.hostname}: " + serve.failure_reason(
                ctx, proc, outcome, during, log_path)
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
        report("restarting", reason=reason)  # no ``master``: the other nodes stop their part
        ctx.log(f"replica {where.index}: restart {report.restarts}/{limit} in {wait:.0f} s")
        if ctx.stop_event.wait(wait):
            report("ended", reason=ctx.stop_reason or "stopped")
            return


class Headless:
    """A replica's node other than its first: its part of each launch, and what it reports."""

    def __init__(self, ctx: NodeContext, where: Place) -> None:
        self.ctx, self.where = ctx, where
        self.log_path = ctx.jobdir.vllm_log(ctx.run.restart or 0, ctx.rank)
        self.proc: OwnedProcess | None = None
        self.attempt = -1  # the replica's ``restarts`` the running (or last) part was started for
        # vLLM's grace on a stop, inside Slurm's KillWait: asked of Slurm now, not during a stop.
        self.grace = serve.stop_grace(slurm_kill_wait())

    def report(self, phase: HeadlessPhase, reason: str = "", log_tail: str = "") -> None:
        ctx = self.ctx
        HeadlessRecord(job_id=ctx.run.job_id, restart=ctx.run.restart or 0, index=self.where.index,
                       rank=ctx.rank, host=ctx.topology.hostname, attempt=self.attempt,
                       phase=phase, reason=reason, log_tail=log_tail,
                       updated_at=time.time()).write(ctx.jobdir.headless(ctx.rank))

    def start(self, rec: ReplicaRecord) -> None:
        """Start this node's part of launch ``rec.restarts``, at the rendezvous it names."""
        ctx, where = self.ctx, self.where
        addr, _, mport = rec.master.rpartition(":")
        argv = serve.serve_argv(ctx, host=addr, port=0, backend="mp", shutdown_timeout=None,  # no API here
                                nnodes=where.size, node_rank=where.member, master_addr=addr,
                                master_port=int(mport))
        self.attempt = rec.restarts
        self.proc = serve.launch(argv, serve.serve_env(os.environ, ctx.env, api_key=None), self.log_path)
        self.report("running")
        ctx.log(f"replica {where.index}: headless part {where.member}/{where.size} started "
                f"(attempt {self.attempt}, rendezvous {rec.master})")

    def step(self, rec: ReplicaRecord | None, job_over: bool) -> bool:
        """Follow the replica's record once; False when this node's part is done for good."""
        over = job_over or (rec is not None and rec.phase in ("failed", "ended"))
        wanted = not over and rec is not None and bool(rec.master)  # a launch is under way
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is not None:
                # What is left of it is stopped, and the reason said in vLLM's words.
                reason = serve.failure_reason(self.ctx, self.proc, serve.Outcome("exited", returncode=rc),
                                              f"on {self.ctx.topology.hostname} (replica {self.where.index}, headless)",
                                              self.log_path)
                self.proc = None
                if not self.ctx.stopper.signalled_soon():
                    self.report("exited", reason, serve.log_tail(self.log_path))
            elif not wanted or (rec is not None and rec.restarts != self.attempt):
                self.stop()  # its first node ended this launch
        if self.proc is None and wanted and rec is not None and rec.restarts > self.attempt:
            self.start(rec)
        return not over

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, self.grace)
            self.proc = None


def serve_headless(ctx: NodeContext, poll: float = HEADLESS_POLL) -> None:
    """On a replica's other nodes: run this node's part of each launch of the replica until the
    replica is over (failed, ended), the job is, or the node is told to stop."""
    part = Headless(ctx, place_of(ctx))
    try:
        while True:
            state = ctx.jobdir.read_state(ctx.run)
            if not part.step(ctx.jobdir.read_replica(part.where.index, ctx.run),
                             job_over=state is not None and state.phase.final):
                return
            if ctx.stop_event.wait(poll):
                return
    finally:
        part.stop()


def run_replica_node(ctx: NodeContext) -> int:
    """A node other than rank 0: serve its part of its replica, then stay until the job ends (exit 0).

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
    """This node's part of its replica, with any error recorded as the replica's failure (on its
    first node) or its part's (on the others), not the node's."""
    where = place_of(ctx)
    try:
        if where.first:
            serve_replica(ctx)
        else:
            serve_headless(ctx)
    except Exception as exc:  # noqa: BLE001 - a replica's failure must be recorded, not lost in a thread
        reason = f"replica {where.index} on {ctx.topology.hostname}: {type(exc).__name__}: {exc}"
        ctx.log(reason)
        if where.first:
            Reporter(ctx, where, "")("failed", reason=reason)
        else:
            part = Headless(ctx, where)
            rec = ctx.jobdir.read_replica(where.index, ctx.run)
            part.attempt = rec.restarts if rec is not None else 0
            part.report("exited", reason)
