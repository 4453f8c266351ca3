"""The node program: ``python -m slurm_vllm node --job-dir DIR``, one srun task per node.

Rank 0 starts the Ray head, publishes its address in ``head.json``, waits until every node is
alive (writing ``nodes k/N`` to ``state.json``), then hands over to the serving step. Other
ranks find the head through the job directory, join with backoff, and stay attached until the
head goes away or the job is cancelled. Whatever happens, the node ends its own processes and
exits with a named reason: 0 when the job ENDED (cancel, time limit), 1 when it FAILED.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from slurm_vllm.errors import NodeError, SlurmVllmError
from slurm_vllm.jobdir import HeadRecord, JobDir, Phase, Run, parse_restart, tail_lines, write_state
from slurm_vllm.node import lifecycle, ray_cluster, topology
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import OwnedProcess, Stopper
from slurm_vllm.node.ports import PortPlan, claim_slot, plan_ports
from slurm_vllm.node.ray_launch import Launch, Launches, launcher_argv
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec, load_spec_json

#: Test/debug aid: the head holds the formed cluster until signalled instead of serving.
ENV_NO_SERVE = "SLURM_VLLM_NODE_NO_SERVE"
#: Debug aid: keep the per-node Ray temp dir (its logs) after the node program ends.
ENV_KEEP_TMP = "SLURM_VLLM_KEEP_RAY_TMP"

HEAD_LOST_AFTER = 10.0  # a worker declares the head gone after this long without its GCS port


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
        self._t0 = time.time()

    # ------------------------------------------------------------ common

    def _write_state(self, phase: Phase, **fields: Any) -> None:
        if self.topo is not None and self.topo.is_head and self.run_id is not None:
            write_state(self.jobdir, self.run_id, phase, **fields)

    def _current_run(self) -> Run:
        assert self.run_id is not None
        return self.run_id

    def _ray_log_path(self) -> Path:
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

    def _head_published(self) -> bool:
        return self.jobdir.read_head(self.run_id) is not None if self.run_id else False

    def _teardown(self) -> None:
        lifecycle.terminate(self.owned, grace=lifecycle.TEARDOWN_GRACE, log_fn=self.log)
        if self.stopper.failed:
            self._save_ray_logs()
        if self.temp_dir and not self.env.get(ENV_KEEP_TMP):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _save_ray_logs(self) -> None:
        """On failure, keep the Ray daemons' own logs (the temp dir is node-local and removed)."""
        if not self.temp_dir or self.topo is None:
            return
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err", "ray_process_exit.log"):
            src = logs / name
            if src.exists() and src.stat().st_size:
                dst = self._ray_log_path().with_name(f"ray-{self.topo.rank}-{name}")
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
                failed, reason = rc != 0, ("serving step exited with code %d" % rc if rc else "serving ended")
        except NodeError as e:
            failed, reason = True, str(e)
            if self.topo is not None and any(p.poll() not in (None, 0) for p in self.owned):
                tail = tail_lines(self._ray_log_path())  # Ray itself failed: show why
        except Exception as e:  # noqa: BLE001 - the reason must reach state.json
            failed, reason = True, f"{type(e).__name__}: {e}"
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
        # Only the head acts on the time-limit warning (it drains vLLM, which needs the workers).
        self.stopper.stop_on_warning = topo.is_head
        self.run_id = run = Run(topo.job_id, parse_restart(self.env.get("SLURM_RESTART_COUNT")))
        self.log(f"node program: {topo.describe()}" + (f", attempt {run.restart}" if run.restart else ""))
        if topo.is_head:
            # A requeued job: the previous run's records move next to its logs, never reread.
            for moved in self.jobdir.archive_previous_run(run):
                self.log(f"kept the previous run's {moved.name} as {moved}")
        self.ports = ports = self._plan_ports(topo)
        self.temp_dir = ray_cluster.make_temp_dir(topo.job_id, topo.rank)
        self._sweep_stale_temp_dirs(topo)
        if spec.backend == "mp":
            return self._run_mp(spec, topo, ports)
        token = self.jobdir.ray_token
        if not token.exists():
            raise NodeError(f"node {topo.hostname}: the job's Ray token {token} is missing")
        if topo.is_head:
            return self._run_head(spec, topo, ports, token)
        return self._run_worker(spec, topo, ports, token)

    def _plan_ports(self, topo: Topology) -> PortPlan:
        """This node's ports, in a slot claimed on this node for the job's lifetime (ports)."""
        return plan_ports(topo.job_id, topo.rank, api_port=self.spec.serve.port if topo.is_head else None,
                          claim=claim_slot, host=topo.hostname)

    def _fresh_ports(self, topo: Topology) -> PortPlan:
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

    # ------------------------------------------------------------ head

    def _ray_args(self, topo: Topology, ports: PortPlan, head_address: str | None) -> list[str]:
        """``ray`` arguments (``start ...``) for this node's head or worker."""
        return ray_cluster.ray_start_args(
            node_ip=topo.node_ip, temp_dir=str(self.temp_dir),
            port_args=ports.ray_start_args(head=head_address is None), head_address=head_address,
            node_name=topo.hostname, num_gpus=ray_cluster.count_gpus(self.env),
            num_cpus=ray_cluster.count_cpus(self.env))

    def _ray_log(self) -> IO[bytes]:
        """This node's Ray log, opened for a child's output (the child keeps its own copy)."""
        path = self._ray_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")

    def _start(self, name: str, argv: list[str], env: Mapping[str, str]) -> OwnedProcess:
        with self._ray_log() as out:
            proc = OwnedProcess(name, argv, env, stdout=out)
        self.owned.append(proc)
        return proc

    def _spawn_launch(self, env: Mapping[str, str]) -> Launch:
        """A Ray launcher waiting for its order (ray_launch), output to this node's Ray log."""
        with self._ray_log() as out:
            launch = Launch.spawn("ray-worker", env, stdout=out)
        self.owned.append(launch.proc)
        return launch

    def _publish_head(self, topo: Topology, ports: PortPlan) -> None:
        assert self.run_id is not None
        HeadRecord(job_id=self.run_id.job_id, restart=self.run_id.restart or 0, host=topo.hostname,
                   ip=topo.node_ip, gcs_port=ports.gcs, api_port=ports.api,
                   published_at=time.time()).write(self.jobdir.head)
        self._wrote_head = True

    def _run_head(self, spec: ServeSpec, topo: Topology, ports: PortPlan, token: Path) -> int:
        n, hosts = topo.num_nodes, list(topo.hosts[: topo.num_nodes])
        self._write_state(Phase.STARTING_RAY, nodes_joined=0, nodes_expected=n, missing_hosts=hosts,
                          reason=None, log_tail="", head_host=topo.hostname)
        env = ray_cluster.ray_env(self.env, node_ip=topo.node_ip, interface=topo.interface, token_path=token)
        os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        os.environ.pop("RAY_AUTH_TOKEN", None)
        t0 = time.monotonic()
        deadline = t0 + spec.ray.cluster_timeout
        ports = self._fresh_ports(topo)
        head = self._start("ray-head", [*launcher_argv(), *self._ray_args(topo, ports, None)], env)
        # Publish at once: workers start probing the GCS port while the head comes up.
        self._publish_head(topo, ports)
        self.log(f"ray head starting: GCS {topo.node_ip}:{ports.gcs}, temp dir {self.temp_dir}, "
                 f"output in {self._ray_log_path()}")
        if not ray_cluster.wait_gcs_open(topo.node_ip, ports.gcs, proc=head, stopper=self.stopper,
                                         timeout=max(0.0, deadline - time.monotonic()), host=topo.hostname):
            return 0
        self.log(f"ray head up in {time.monotonic() - t0:.1f}s; waiting for {n} nodes")
        address = f"{topo.node_ip}:{ports.gcs}"
        watcher = ray_cluster.GcsWatcher(address)

        def progress(k: int, missing: list[str]) -> None:
            self.log(f"nodes {k}/{n}" + (f" (waiting for {', '.join(missing)})" if missing else ""))
            self._write_state(Phase.STARTING_RAY, nodes_joined=k, nodes_expected=n, missing_hosts=missing)

        try:
            alive = ray_cluster.wait_for_nodes(watcher, expected=n, hosts=hosts,
                                               timeout=max(0.0, deadline - time.monotonic()),
                                               stopper=self.stopper, head=head, on_progress=progress,
                                               started_at=t0)
        except ray_cluster.ClusterTimeout as e:
            self._write_state(Phase.STARTING_RAY, nodes_joined=e.joined, missing_hosts=e.missing)
            raise NodeError(f"{e}{self._last_words(hosts, e.missing)}") from None
        if alive is None:
            return 0
        took = time.monotonic() - t0
        self.log(f"ray cluster ready: {n}/{n} nodes in {took:.1f}s: "
                 + ", ".join(f"{a.name}={a.ip}" for a in alive))
        self._write_state(Phase.LOADING_MODEL, nodes_joined=n, nodes_expected=n, missing_hosts=[],
                          ray_address=address, cluster_ready_seconds=round(took, 2),
                          nodes=[{"host": a.name, "ip": a.ip, "head": a.is_head} for a in alive])
        child_env = dict(env, RAY_ADDRESS=address)
        ctx = NodeContext(spec=spec, jobdir=self.jobdir, run=self._current_run(), topology=topo, ports=ports, env=child_env,
                          stopper=self.stopper, ray_address=address,
                          temp_dir=str(self.temp_dir), log=self.log, owned=self.owned)
        watchdog = threading.Thread(target=self._watch_cluster, args=(watcher, head, n, hosts),
                                    name="cluster-watchdog", daemon=True)
        watchdog.start()
        return self._serving_step(ctx)

    def _last_words(self, hosts: list[str], missing: list[str]) -> str:
        """What each missing node last logged: tells "never started" from "stuck joining"."""
        parts = []
        for host in missing:
            if host not in hosts:
                continue
            lines = tail_lines(self.jobdir.node_log(hosts.index(host), self._current_run().restart or 0), 1).strip()
            parts.append(f"{host}: " + (repr(lines[:160]) if lines else "no log yet (its node program never started?)"))
        return ("; last log line of " + "; ".join(parts)) if parts else ""

    def _watch_cluster(self, watcher: ray_cluster.GcsWatcher, head: OwnedProcess, n: int,
                       hosts: list[str]) -> None:
        """While serving: fail the job when the Ray head dies or a node leaves the cluster."""
        short = 0
        while not self.stopper.wait(1.0):
            if not head.running:
                self.stopper.fail(f"the Ray head process exited (code {head.poll()})")
                return
            nodes = watcher.nodes(timeout=2.0)
            if nodes is None:
                continue
            alive = ray_cluster.alive_nodes(nodes)
            short = short + 1 if len(alive) < n else 0
            if short >= 2:
                gone = ray_cluster.missing_hosts(hosts, alive)
                self.stopper.fail(f"node(s) {', '.join(gone) or '?'} left the Ray cluster "
                                  f"({len(alive)}/{n} alive)")
                return

    def _serving_step(self, ctx: NodeContext) -> int:
        """Hand the formed cluster to vLLM (serve.py), or hold it when serving is switched off."""
        if self.env.get(ENV_NO_SERVE) == "1":
            return hold(ctx, "serving is switched off (%s=1): holding the cluster" % ENV_NO_SERVE)
        try:
            from slurm_vllm.node import serve  # the vLLM step; imported late: it pulls in more
        except ImportError:
            return hold(ctx, "no serving step installed (slurm_vllm.node.serve): holding the cluster")
        return int(serve.run_head_serving(ctx))

    # ------------------------------------------------------------ mp backend

    def _run_mp(self, spec: ServeSpec, topo: Topology, ports: PortPlan) -> int:
        """Backend ``mp``: no Ray; every node runs its share of vLLM (serve.run_mp_node)."""
        env = ray_cluster.ray_env(self.env, node_ip=topo.node_ip, interface=topo.interface, token_path=None)
        if topo.is_head:
            self._write_state(Phase.LOADING_MODEL, nodes_joined=topo.num_nodes,
                              nodes_expected=topo.num_nodes, missing_hosts=[], reason=None)
            self._publish_head(topo, ports)
        ctx = NodeContext(spec=spec, jobdir=self.jobdir, run=self._current_run(), topology=topo, ports=ports, env=env,
                          stopper=self.stopper, ray_address=None,
                          temp_dir=str(self.temp_dir), log=self.log, owned=self.owned)
        if self.env.get(ENV_NO_SERVE) == "1":
            return hold(ctx, "serving is switched off: holding")
        from slurm_vllm.node import serve

        return int(serve.run_mp_node(ctx))

    # ------------------------------------------------------------ workers

    def _wait_head_json(self, topo: Topology, deadline: float) -> HeadRecord | None:
        backoff = ray_cluster.Backoff(initial=0.1, cap=0.5)  # a stat on the shared filesystem
        said = False
        while not self.stopper.stopped:
            info = self.jobdir.read_head(self.run_id)
            if info is not None:
                return info
            state = self.jobdir.read_state(self.run_id)
            if state is not None and state.phase.final:
                raise NodeError(f"the head reported {state.phase}: {state.reason}")
            if not said:
                self.log(f"waiting for the head {topo.head_host} to publish its address in {self.jobdir.head}")
                said = True
            if time.monotonic() >= deadline:
                raise ray_cluster.HeadUnreachable(
                    f"head {topo.head_host} never published its address ({self.jobdir.head}) within "
                    f"{self.spec.ray.join_timeout:.0f}s")
            ray_cluster.sleep_until_next(backoff, deadline, self.stopper)
        return None

    def _run_worker(self, spec: ServeSpec, topo: Topology, ports: PortPlan, token: Path) -> int:
        t0 = time.monotonic()
        deadline = t0 + spec.ray.join_timeout
        # A launcher imports Ray's CLI now, while the head comes up, so it is ready the moment
        # the head is (ray_launch).
        launches = Launches(self._spawn_launch, ray_cluster.ray_env(
            self.env, node_ip=topo.node_ip, interface=topo.interface, token_path=token))
        try:
            return self._join_and_stay(spec, topo, token, t0, deadline, launches)
        finally:
            launches.close()

    def _join_and_stay(self, spec: ServeSpec, topo: Topology, token: Path, t0: float,
                       deadline: float, launches: Launches) -> int:
        info = self._wait_head_json(topo, deadline)
        if info is None:
            return 0
        head_ip, gcs_port = info.ip, info.gcs_port
        topo = topology.retarget(topo, head_ip, interface=spec.network.interface, cidr=spec.network.cidr,
                                 env=self.env)
        self.topo = topo
        env = ray_cluster.ray_env(self.env, node_ip=topo.node_ip, interface=topo.interface, token_path=token)

        def start(seconds_left: float) -> Launch:
            fresh = self._fresh_ports(topo)  # planned at start; the head may have kept us waiting
            launch = launches.next(env)
            launch.order(self._ray_args(topo, fresh, f"{head_ip}:{gcs_port}"), await_head=f"{head_ip}:{gcs_port}",
                         timeout=seconds_left, node=(topo.node_ip, fresh.node_manager))
            return launch

        def stop_proc(p: OwnedProcess) -> None:
            lifecycle.stop(p, grace=lifecycle.TEARDOWN_GRACE, log_fn=self.log)
            if p in self.owned:
                self.owned.remove(p)

        joined = ray_cluster.join_cluster(
            start=start, head_host=topo.head_host, head_ip=head_ip, gcs_port=gcs_port,
            timeout=spec.ray.join_timeout, stopper=self.stopper, log=self.log, terminate=stop_proc,
            backoff=ray_cluster.Backoff(initial=0.2, cap=2.0), started_at=t0)
        if joined is None:
            return 0
        self.log(f"joined the Ray cluster at {head_ip}:{gcs_port} as {topo.node_ip} in {joined.seconds:.1f}s "
                 f"({joined.attempts} attempt(s))")
        return self._stay_attached(topo, joined.proc, head_ip, gcs_port)

    def _stay_attached(self, topo: Topology, proc: OwnedProcess, head_ip: str, gcs_port: int) -> int:
        """Keep the raylet until cancelled; fail with a named reason when the head goes away."""
        lost_since: float | None = None
        last_probe = 0.0
        said_warned = False
        while not self.stopper.wait(0.5):
            if self.stopper.warned and not said_warned:
                self.log("time-limit warning: staying in the cluster until the head has drained vLLM")
                said_warned = True
            if not proc.running:
                gone = not ray_cluster.tcp_open(head_ip, gcs_port)
                raise ray_cluster.HeadUnreachable(
                    f"head {topo.head_host} went away ({head_ip}:{gcs_port}): the local raylet exited "
                    f"with code {proc.poll()}" if gone else
                    f"the Ray worker on {topo.hostname} exited with code {proc.poll()}")
            state = self.jobdir.read_state(self.run_id)
            if state is not None and state.phase.final:
                if state.phase is Phase.FAILED:
                    raise NodeError(f"the head reported FAILED: {state.reason}")
                self.stopper.stop(f"the head ended the job: {state.reason}")
                break
            now = time.monotonic()
            if now - last_probe >= 1.0:
                last_probe = now
                if ray_cluster.tcp_open(head_ip, gcs_port, timeout=1.0):
                    lost_since = None
                elif lost_since is None:
                    lost_since = now
                elif now - lost_since >= HEAD_LOST_AFTER:
                    raise ray_cluster.HeadUnreachable(
                        f"head {topo.head_host} went away: {head_ip}:{gcs_port} unreachable for "
                        f"{now - lost_since:.0f}s")
        return 0


def hold(ctx: NodeContext, why: str) -> int:
    """Keep the formed cluster until the job is signalled (test/debug aid; also the fallback)."""
    ctx.log(why)
    ctx.stop_event.wait()
    return 0


def run_node(job_dir: str | Path, env: Mapping[str, str] | None = None) -> int:
    """Entry used by the CLI: run this node's part of the job; returns the exit code."""
    return NodeProgram(job_dir, env).run()
