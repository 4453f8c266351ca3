"""Rank 0's part of the node program: start the Ray head, publish it in ``head.json``, wait
until every node is alive (``nodes k/N`` in ``state.json``, naming the missing hosts and what
they last logged), watch the cluster while it serves, and hand it to the serving step."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm import timeline
from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import Mark, Phase, tail_lines
from slurm_vllm.node import ray_cluster
from slurm_vllm.node.context import ENV_NO_SERVE, NodeContext, hold
from slurm_vllm.node.gcs_watch import GcsWatcherProcess
from slurm_vllm.node.lifecycle import OwnedProcess
from slurm_vllm.node.moments import ask_slurm_times
from slurm_vllm.node.ports import PortPlan
from slurm_vllm.node.ray_launch import launcher_argv
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec

if TYPE_CHECKING:
    from slurm_vllm.node.program import NodeProgram


class Head:
    """The head's steps, on the node program ``p`` (its job directory, stopper and processes)."""

    def __init__(self, program: NodeProgram) -> None:
        self.p = program

    def run(self, spec: ServeSpec, topo: Topology, ports: PortPlan, token: Path) -> int:
        n, hosts = topo.num_nodes, list(topo.hosts[: topo.num_nodes])
        self.p.write_state(Phase.STARTING_RAY, nodes_joined=0, nodes_expected=n, missing_hosts=hosts,
                           reason=None, log_tail="", head_host=topo.hostname,
                           marks=[Mark(name=timeline.ALLOCATED, at=self.p.started_at)])
        ask_slurm_times(self.p.jobdir, self.p.current_run(), self.p.log)
        env = ray_cluster.ray_env(self.p.env, node_ip=topo.node_ip, interface=topo.interface, token_path=token)
        os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        os.environ.pop("RAY_AUTH_TOKEN", None)
        t0 = time.monotonic()
        deadline = t0 + spec.ray.cluster_timeout
        ports = self.p.fresh_ports(topo)
        address = f"{topo.node_ip}:{ports.gcs}"
        # Ray's GCS client in a child of its own (its import overlaps the head's start): the
        # node program never loads Ray's core (node/gcs_watch.py).
        watcher = GcsWatcherProcess(address, env, owned=self.p.owned)
        head = self.p.start("ray-head", [*launcher_argv(), *self.p.ray_args(topo, ports, None)], env)
        # Publish at once: workers start probing the GCS port while the head comes up.
        self.p.publish_head(topo, ports)
        self.p.log(f"ray head starting: GCS {topo.node_ip}:{ports.gcs}, temp dir {self.p.temp_dir}, "
                   f"output in {self.p.ray_log_path()}")
        if not ray_cluster.wait_gcs_open(topo.node_ip, ports.gcs, proc=head, stopper=self.p.stopper,
                                         timeout=max(0.0, deadline - time.monotonic()), host=topo.hostname):
            return 0
        self.p.log(f"ray head up in {time.monotonic() - t0:.1f}s; waiting for {n} nodes")
        timeline.record(self.p.jobdir, self.p.current_run(), timeline.RAY_HEAD, log=self.p.log)

        def progress(k: int, missing: list[str]) -> None:
            self.p.log(f"nodes {k}/{n}" + (f" (waiting for {', '.join(missing)})" if missing else ""))
            self.p.write_state(Phase.STARTING_RAY, nodes_joined=k, nodes_expected=n, missing_hosts=missing,
                               marks=timeline.joined_marks(k, n))

        try:
            alive = ray_cluster.wait_for_nodes(watcher, expected=n, hosts=hosts,
                                               timeout=max(0.0, deadline - time.monotonic()),
                                               stopper=self.p.stopper, head=head, on_progress=progress,
                                               started_at=t0)
        except ray_cluster.ClusterTimeout as e:
            self.p.write_state(Phase.STARTING_RAY, nodes_joined=e.joined, missing_hosts=e.missing)
            raise NodeError(f"{e}{self._last_words(hosts, e.missing)}") from None
        if alive is None:
            return 0
        took = time.monotonic() - t0
        if not self.p.verdict.wait():  # the pre-flight, decided beside the formation, gates vLLM
            return 0
        self.p.log(f"ray cluster ready: {n}/{n} nodes in {took:.1f}s: "
                   + ", ".join(f"{a.name}={a.ip}" for a in alive))
        self.p.write_state(Phase.LOADING_MODEL, nodes_joined=n, nodes_expected=n, missing_hosts=[],
                           ray_address=address, cluster_ready_seconds=round(took, 2),
                           marks=timeline.joined_marks(n, n),
                           nodes=[{"host": a.name, "ip": a.ip, "head": a.is_head} for a in alive])
        child_env = dict(env, RAY_ADDRESS=address)
        ctx = self.p.context(topo, ports, child_env, ray_address=address)
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
            lines = tail_lines(self.p.jobdir.node_log(hosts.index(host), self.p.current_run().restart or 0), 1).strip()
            parts.append(f"{host}: " + (repr(lines[:160]) if lines else "no log yet (its node program never started?)"))
        return ("; last log line of " + "; ".join(parts)) if parts else ""

    def _watch_cluster(self, watcher: ray_cluster.NodeSource, head: OwnedProcess, n: int,
                       hosts: list[str]) -> None:
        """While serving: fail the job when the Ray head dies or a node leaves the cluster."""
        short = 0
        while not self.p.stopper.wait(1.0):
            if not head.running:
                self.p.stopper.fail_unless_signalled(f"the Ray head process exited (code {head.poll()})")
                return
            nodes = watcher.nodes(timeout=2.0)
            if nodes is None:
                continue
            alive = ray_cluster.alive_nodes(nodes)
            short = short + 1 if len(alive) < n else 0
            if short >= 2:
                gone = ray_cluster.missing_hosts(hosts, alive)
                self.p.stopper.fail_unless_signalled(f"node(s) {', '.join(gone) or '?'} left the Ray "
                                                     f"cluster ({len(alive)}/{n} alive)")
                return

    def _serving_step(self, ctx: NodeContext) -> int:
        """Hand the formed cluster to vLLM (serve.py), or hold it when serving is switched off."""
        if self.p.env.get(ENV_NO_SERVE) == "1":
            return hold(ctx, f"serving is switched off ({ENV_NO_SERVE}=1): holding the cluster")
        try:
            from slurm_vllm.node import serve  # the vLLM step; imported late: it pulls in more
        except ImportError:
            return hold(ctx, "no serving step installed (slurm_vllm.node.serve): holding the cluster")
        return int(serve.run_head_serving(ctx))
