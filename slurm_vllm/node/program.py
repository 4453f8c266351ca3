"""The node program: ``python -m slurm_vllm node --job-dir DIR``, one srun task per node.

This module is what every node shares: reading the spec, finding its place (topology, ports,
Ray temp dir), the signals, the final state and the teardown. The roles are beside it: rank 0
runs :class:`~slurm_vllm.node.head.Head` (Ray head, wait for every node, serve), the others
:class:`~slurm_vllm.node.worker.Worker` (find the head, join, stay attached); backend ``mp``
has no Ray and runs vLLM's own multi-node mode on every node. Whatever happens, the node ends
its own processes and exits with a named reason: 0 when the job ENDED (cancel, time limit), 1
when it FAILED.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from slurm_vllm.errors import NodeError, SlurmVllmError
from slurm_vllm.jobdir import HeadRecord, JobDir, Mark, Phase, Run, parse_restart, tail_lines, update_state, write_state
from slurm_vllm.node import lifecycle, preflight, ray_cluster, staging, topology, warm
from slurm_vllm.node.context import ENV_NO_SERVE, NodeContext, hold
from slurm_vllm.node.head import Head
from slurm_vllm.node.lifecycle import OwnedProcess, Stopper
from slurm_vllm.node.moments import ask_slurm_times
from slurm_vllm.node.ports import PortPlan, claim_slot, plan_ports
from slurm_vllm.node.ray_launch import Launch
from slurm_vllm.node.topology import Topology
from slurm_vllm.node.worker import Worker
from slurm_vllm.spec import ServeSpec, load_spec_json
from slurm_vllm.timeline import ALLOCATED

#: Debug aid: keep the per-node Ray temp dir (its logs) after the node program ends.
ENV_KEEP_TMP = "SLURM_VLLM_KEEP_RAY_TMP"

def serves_api(spec: ServeSpec, rank: int) -> bool:
    """Whether node ``rank`` serves an API: the head, and with replicas each replica's first node.

    Only these act on the time-limit warning: they drain their vLLM, which needs the other
    nodes until it has (those end when the state says so)."""
    return rank == 0 or (spec.replicas > 1 and rank % spec.nodes_per_replica == 0)


def load_spec(jobdir: JobDir) -> ServeSpec:
    """spec.json as the login side wrote it (local paths are not re-checked on the node)."""
    if not jobdir.spec.exists():
        raise NodeError(f"no spec.json in {jobdir.path}; is --job-dir the job directory?")
    return load_spec_json(jobdir.spec)


class NodeProgram:
    """One node's run; ``run()`` returns the exit code."""

    def __init__(self, job_dir: str | Path, env: Mapping[str, str] | None = None,
                 hostname: str | None = None) -> None:
        self.jobdir = JobDir(Path(job_dir))
        self.env = dict(os.environ if env is None else env)
        self.hostname = hostname
        self.stopper = Stopper()
        self.owned: list[OwnedProcess] = []
        self.log = lifecycle.log
        self.temp_dir: str | None = None
        self.topo: Topology | None = None
        self.run_id: Run | None = None
        self._wrote_head = False
        self.staged: staging.Staged | None = None  # this node's copy of the weights (stage_weights)
        self.started_at = time.time()  # the timeline's "allocated" on the head
        self.verdict: preflight.Verdict = preflight.PASSED  # the pre-flight's, reached beside Ray

    # ------------------------------------------------------------ shared by every role

    def write_state(self, phase: Phase, **fields: Any) -> None:
        if self.topo is not None and self.topo.is_head and self.run_id is not None:
            write_state(self.jobdir, self.run_id, phase, **fields)

    def update_state(self, otherwise: Phase | None = None, **fields: Any) -> None:
        """Merge ``fields`` into state.json keeping its phase (jobdir.update_state); head only."""
        if self.topo is not None and self.topo.is_head and self.run_id is not None:
            update_state(self.jobdir, self.run_id, otherwise=otherwise, **fields)

    def current_run(self) -> Run:
        assert self.run_id is not None
        return self.run_id

    def ray_log_path(self) -> Path:
        assert self.topo is not None and self.run_id is not None
        return self.jobdir.ray_log(self.topo.rank, self.run_id.restart or 0)

    def _final_state(self, failed: bool, reason: str, log_tail: str = "") -> None:
        """Write ENDED/FAILED to state.json.

        The head always does, unless something it started (the serving step) already wrote a
        final phase during this run, whose reason is the more precise one. A worker only writes
        FAILED when no head ever published itself: then nobody else can say why the job stopped.
        """
        topo, run = self.topo, self.run_id
        if topo is None or run is None:
            self._early_final_state(failed, reason)
            return
        state = self.jobdir.read_state(run)
        final_now = state is not None and state.phase.final
        if topo.is_head:
            # Keep a final phase the serving step wrote, except an ENDED that hides a failure.
            if final_now and (not failed or (state is not None and state.phase is Phase.FAILED)):
                return
        elif not failed or final_now or self._head_published():
            return
        write_state(self.jobdir, run, Phase.FAILED if failed else Phase.ENDED, reason=reason,
                    reported_by=topo.hostname, log_tail=log_tail)

    def _early_final_state(self, failed: bool, reason: str) -> None:
        """A node that failed before it knew its place (e.g. no address on ``network.interface``):
        rank 0, from Slurm's variables, still names the reason; others only if nobody has yet."""
        if not failed:
            return
        try:
            rank = topology.rank_from_env(self.env)
            run = Run(topology.job_id_from_env(self.env), parse_restart(self.env.get("SLURM_RESTART_COUNT")))
        except NodeError:
            return
        if rank != 0 and (self.jobdir.read_state(run) is not None or self.jobdir.read_head(run) is not None):
            return
        write_state(self.jobdir, run, Phase.FAILED, reason=reason, reported_by=self.hostname or os.uname().nodename)

    def _head_published(self) -> bool:
        return self.jobdir.read_head(self.run_id) is not None if self.run_id else False

    def _teardown(self) -> None:
        lifecycle.terminate(self.owned, grace=lifecycle.TEARDOWN_GRACE, log_fn=self.log)
        staging.release(self.staged, self.log)
        if self.stopper.failed:
            self._save_ray_logs()
        if self.temp_dir and not self.env.get(ENV_KEEP_TMP):
            ray_cluster.remove_temp_dir(self.temp_dir)

    def _save_ray_logs(self) -> None:
        """On failure, keep the Ray daemons' own logs (the temp dir is node-local and removed)."""
        if not self.temp_dir or self.topo is None:
            return
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err", "ray_process_exit.log"):
            src = logs / name
            if src.exists() and src.stat().st_size:
                dst = self.ray_log_path().with_name(f"ray-{self.topo.rank}-{name}")
                try:
                    with open(src, "rb") as f:
                        f.seek(max(0, src.stat().st_size - 256 * 1024))
                        dst.write_bytes(f.read())
                except OSError:
                    pass

    def run(self) -> int:
        lifecycle.install_signal_handlers(self.stopper)
        lifecycle.become_subreaper()
        failed, reason, tail = False, "", ""
        try:
            spec = load_spec(self.jobdir)
            rc = self._run(spec)
            if self.stopper.stopped:
                failed, reason = self.stopper.failed, self.stopper.reason or "stopped"
            else:
                failed, reason = rc != 0, (f"serving step exited with code {rc}" if rc else "serving ended")
        except NodeError as e:
            failed, reason = True, str(e)
            self.stopper.fail(reason)  # helper threads (the pre-flight beside Ray) stop too
            if self.topo is not None and any(p.poll() not in (None, 0) for p in self.owned):
                tail = tail_lines(self.ray_log_path())  # Ray itself failed: show why
        except Exception as e:  # noqa: BLE001 - the reason must reach state.json
            failed, reason = True, f"{type(e).__name__}: {e}"
            self.stopper.fail(reason)
        finally:
            self.stopper.failed = self.stopper.failed or failed
            self._teardown()
        self.log(("FAILED: " if failed else "ENDED: ") + reason)
        if tail:
            self.log("last lines of the Ray log:\n" + tail)
        try:
            self._final_state(failed, reason, tail)
        except OSError as e:
            self.log(f"could not write state.json: {e}")
        return 1 if failed else 0

    def _run(self, spec: ServeSpec) -> int:
        self.spec = spec
        topo = topology.discover(self.env, interface=spec.network.interface, cidr=spec.network.cidr,
                                 hostname=self.hostname)
        if self.hostname is None and topo.rank < len(topo.hosts):
            # Name the node as Slurm does, so missing hosts can be reported by name.
            topo = dataclasses.replace(topo, hostname=topo.hosts[topo.rank])
        self.topo = topo
        self.stopper.stop_on_warning = serves_api(spec, topo.rank)
        self.run_id = run = Run(topo.job_id, parse_restart(self.env.get("SLURM_RESTART_COUNT")))
        self.log(f"node program: {topo.describe()}" + (f", attempt {run.restart}" if run.restart else ""))
        if topo.is_head:
            # A requeued job: the previous run's records move next to its logs, never reread.
            for moved in self.jobdir.archive_previous_run(run):
                self.log(f"kept the previous run's {moved.name} as {moved}")
        self.env.update(warm.cache_vars(spec.environment.cache_dir, self.env, self.log))
        self.ports = ports = self._plan_ports(topo)
        self.temp_dir = ray_cluster.make_temp_dir(topo.job_id, topo.rank)
        self._sweep_stale_temp_dirs(topo)
        if preflight.uses_ray(spec):
            # Every node's own checks now; their exchange and the all-reduce run while Ray
            # forms, and the head waits for the verdict before vLLM starts (Head.run).
            self.verdict = preflight.begin(self, spec, topo, ports)
        elif not preflight.run(self, spec, topo, ports):  # every node's checks, before vLLM
            return 0
        if self.stopper.stopped:
            return 0
        self.staged = staging.stage_node(spec, topo, self.jobdir, run, self.env, self.log, self.stopper.event)
        if self.stopper.stopped:
            return 0
        if spec.replicas > 1:
            return self._run_replicas(spec, topo, ports)
        if spec.backend == "mp":
            return self._run_mp(spec, topo, ports)
        token = self.jobdir.ray_token
        if not token.exists():
            raise NodeError(f"node {topo.hostname}: the job's Ray token {token} is missing")
        if topo.is_head:
            return Head(self).run(spec, topo, ports, token)
        return Worker(self).run(spec, topo, ports, token)

    def _plan_ports(self, topo: Topology) -> PortPlan:
        """This node's ports, in a slot claimed on this node for the job's lifetime (ports).

        ``serve.port`` is the job's public port: vLLM's, or with replicas the front's."""
        public = self.spec.serve.port if topo.is_head else None
        if self.spec.replicas > 1:
            return plan_ports(topo.job_id, topo.rank, front_port=public, claim=claim_slot, host=topo.hostname)
        return plan_ports(topo.job_id, topo.rank, api_port=public, claim=claim_slot, host=topo.hostname)

    def fresh_ports(self, topo: Topology) -> PortPlan:
        """The plan, tested again right before ``ray start`` binds it; replanned if something took
        a port since (a worker plans at start and may wait minutes for the head)."""
        taken = self.ports.taken()
        if taken:
            self.log(f"port(s) {', '.join(map(str, taken))} were taken since they were planned: planning again")
            self.ports = self._plan_ports(topo)
        return self.ports

    def _sweep_stale_temp_dirs(self, topo: Topology) -> None:
        """Clear temp dirs left by earlier jobs whose node program Slurm had to kill."""
        from slurm_vllm import slurm  # noqa: PLC0415 - the one Slurm runner, only needed here

        try:
            listed = slurm.squeue(me=True, timeout=15)
        except SlurmVllmError:
            return  # without Slurm's word, leave everything alone
        running = {j.job_id for j in listed if not j.category.final} | {topo.job_id}
        removed = ray_cluster.sweep_stale_temp_dirs(running, root=str(Path(str(self.temp_dir)).parent))
        if removed:
            self.log(f"removed {len(removed)} stale Ray temp dir(s) of ended jobs")

    # ------------------------------------------------------------ what the roles use

    def ray_args(self, topo: Topology, ports: PortPlan, head_address: str | None) -> list[str]:
        """``ray`` arguments (``start ...``) for this node's head or worker."""
        return ray_cluster.ray_start_args(
            node_ip=topo.node_ip, temp_dir=str(self.temp_dir),
            port_args=ports.ray_start_args(head=head_address is None), head_address=head_address,
            node_name=topo.hostname, num_gpus=ray_cluster.count_gpus(self.env),
            num_cpus=ray_cluster.count_cpus(self.env))

    def _ray_log(self) -> IO[bytes]:
        """This node's Ray log, opened for a child's output (the child keeps its own copy)."""
        path = self.ray_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")

    def start(self, name: str, argv: list[str], env: Mapping[str, str], log: Path | None = None) -> OwnedProcess:
        """Start an owned process, its output appended to ``log`` (default this node's Ray log)."""
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with (open(log, "ab") if log is not None else self._ray_log()) as out:
            proc = OwnedProcess(name, argv, env, stdout=out)
        self.owned.append(proc)
        return proc

    def spawn_launch(self, env: Mapping[str, str]) -> Launch:
        """A Ray launcher waiting for its order (ray_launch), output to this node's Ray log."""
        with self._ray_log() as out:
            launch = Launch.spawn("ray-worker", env, stdout=out)
        self.owned.append(launch.proc)
        return launch

    def context(self, topo: Topology, ports: PortPlan, env: dict[str, str], ray_address: str | None) -> NodeContext:
        """What the serving step gets from this node (node/context.py)."""
        return NodeContext(spec=self.spec, jobdir=self.jobdir, run=self.current_run(), topology=topo, ports=ports,
                           env=env, stopper=self.stopper, ray_address=ray_address, temp_dir=str(self.temp_dir),
                           log=self.log, owned=self.owned,
                           model_path=str(self.staged.path) if self.staged is not None else None)

    def publish_head(self, topo: Topology, ports: PortPlan) -> None:
        """head.json: where this run's head listens (Ray's GCS, the API port)."""
        assert self.run_id is not None
        HeadRecord(job_id=self.run_id.job_id, restart=self.run_id.restart or 0, host=topo.hostname,
                   ip=topo.node_ip, gcs_port=ports.gcs, api_port=ports.api,
                   published_at=time.time()).write(self.jobdir.head)
        self._wrote_head = True

    # ------------------------------------------------------------ replicas

    def _run_replicas(self, spec: ServeSpec, topo: Topology, ports: PortPlan) -> int:
        """Replicas: every node serves its part of its replica (node/replica.py); rank 0 also runs
        the router and its authenticating front and decides the job's phase (node/router.py)."""
        from slurm_vllm.node import replica  # noqa: PLC0415 - the serving side, imported late
        from slurm_vllm.node.router import RouterSupervisor  # noqa: PLC0415

        env = ray_cluster.ray_env(self.env, node_ip=topo.node_ip, interface=topo.interface, token_path=None)
        ctx = self.context(topo, ports, env, ray_address=None)
        if not topo.is_head:
            return replica.run_replica_node(ctx)
        self.write_state(Phase.LOADING_MODEL, nodes_joined=topo.num_nodes, nodes_expected=topo.num_nodes,
                         missing_hosts=[], reason=None, replicas_ready=0, replicas_expected=spec.replicas,
                         head_host=topo.hostname)
        self.publish_head(topo, ports)
        thread = replica.start_replica_thread(ctx)
        return RouterSupervisor(ctx, self.start).run(thread)

    # ------------------------------------------------------------ mp backend

    def _run_mp(self, spec: ServeSpec, topo: Topology, ports: PortPlan) -> int:
        """Backend ``mp``: no Ray; every node runs its share of vLLM (serve.run_mp_node)."""
        env = ray_cluster.ray_env(self.env, node_ip=topo.node_ip, interface=topo.interface, token_path=None)
        if topo.is_head:
            self.write_state(Phase.LOADING_MODEL, nodes_joined=topo.num_nodes,
                             nodes_expected=topo.num_nodes, missing_hosts=[], reason=None,
                             marks=[Mark(name=ALLOCATED, at=self.started_at)])
            ask_slurm_times(self.jobdir, self.current_run(), self.log)
            self.publish_head(topo, ports)
        ctx = self.context(topo, ports, env, ray_address=None)
        if self.env.get(ENV_NO_SERVE) == "1":
            return hold(ctx, "serving is switched off: holding")
        from slurm_vllm.node import serve

        return int(serve.run_mp_node(ctx))


def run_node(job_dir: str | Path, env: Mapping[str, str] | None = None) -> int:
    """Entry used by the CLI: run this node's part of the job; returns the exit code."""
    return NodeProgram(job_dir, env).run()
