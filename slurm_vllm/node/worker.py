"""A worker's part of the node program: find the head through ``head.json``, join its Ray
cluster with retries and a deadline, and stay attached until the job ends; fail with a named
reason when the head goes away."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import HeadRecord, Phase
from slurm_vllm.node import lifecycle, ray_cluster, topology
from slurm_vllm.node.lifecycle import OwnedProcess
from slurm_vllm.node.ports import PortPlan
from slurm_vllm.node.ray_launch import Launch, Launches
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec

if TYPE_CHECKING:
    from slurm_vllm.node.program import NodeProgram

HEAD_LOST_AFTER = 10.0  # a worker declares the head gone after this long without its GCS port


class Worker:
    """A worker's steps, on the node program ``p`` (its job directory, stopper and processes)."""

    def __init__(self, program: NodeProgram) -> None:
        self.p = program

    def _wait_head_json(self, topo: Topology, deadline: float) -> HeadRecord | None:
        backoff = ray_cluster.Backoff(initial=0.1, cap=0.5)  # a stat on the shared filesystem
        said = False
        while not self.p.stopper.stopped:
            info = self.p.jobdir.read_head(self.p.run_id)
            if info is not None:
                return info
            state = self.p.jobdir.read_state(self.p.run_id)
            if state is not None and state.phase.final:
                raise NodeError(f"the head reported {state.phase}: {state.reason}")
            if not said:
                self.p.log(f"waiting for the head {topo.head_host} to publish its address in {self.p.jobdir.head}")
                said = True
            if time.monotonic() >= deadline:
                raise ray_cluster.HeadUnreachable(
                    f"head {topo.head_host} never published its address ({self.p.jobdir.head}) within "
                    f"{self.p.spec.ray.join_timeout:.0f}s")
            ray_cluster.sleep_until_next(backoff, deadline, self.p.stopper)
        return None

    def run(self, spec: ServeSpec, topo: Topology, ports: PortPlan, token: Path) -> int:
        t0 = time.monotonic()
        deadline = t0 + spec.ray.join_timeout
        # A launcher imports Ray's CLI now, while the head comes up, so it is ready the moment
        # the head is (ray_launch).
        launches = Launches(self.p.spawn_launch, ray_cluster.ray_env(
            self.p.env, node_ip=topo.node_ip, interface=topo.interface, token_path=token))
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
                                 env=self.p.env)
        self.p.topo = topo
        env = ray_cluster.ray_env(self.p.env, node_ip=topo.node_ip, interface=topo.interface, token_path=token)

        def start(seconds_left: float) -> Launch:
            fresh = self.p.fresh_ports(topo)  # planned at start; the head may have kept us waiting
            launch = launches.next(env)
            launch.order(self.p.ray_args(topo, fresh, f"{head_ip}:{gcs_port}"), await_head=f"{head_ip}:{gcs_port}",
                         timeout=seconds_left, node=(topo.node_ip, fresh.node_manager))
            return launch

        def stop_proc(p: OwnedProcess) -> None:
            lifecycle.stop(p, grace=lifecycle.TEARDOWN_GRACE, log_fn=self.p.log)
            if p in self.p.owned:
                self.p.owned.remove(p)

        joined = ray_cluster.join_cluster(
            start=start, head_host=topo.head_host, head_ip=head_ip, gcs_port=gcs_port,
            timeout=spec.ray.join_timeout, stopper=self.p.stopper, log=self.p.log, terminate=stop_proc,
            backoff=ray_cluster.Backoff(initial=0.2, cap=2.0), started_at=t0)
        if joined is None:
            return 0
        self.p.log(f"joined the Ray cluster at {head_ip}:{gcs_port} as {topo.node_ip} in {joined.seconds:.1f}s "
                   f"({joined.attempts} attempt(s))")
        return self._stay_attached(topo, joined.proc, head_ip, gcs_port)

    def _stay_attached(self, topo: Topology, proc: OwnedProcess, head_ip: str, gcs_port: int) -> int:
        """Keep the raylet until cancelled; fail with a named reason when the head goes away."""
        lost_since: float | None = None
        last_probe = 0.0
        said_warned = False
        while not self.p.stopper.wait(0.5):
            if self.p.stopper.warned and not said_warned:
                self.p.log("time-limit warning: staying in the cluster until the head has drained vLLM")
                said_warned = True
            if not proc.running:
                gone = not ray_cluster.tcp_open(head_ip, gcs_port)
                raise ray_cluster.HeadUnreachable(
                    f"head {topo.head_host} went away ({head_ip}:{gcs_port}): the local raylet exited "
                    f"with code {proc.poll()}" if gone else
                    f"the Ray worker on {topo.hostname} exited with code {proc.poll()}")
            state = self.p.jobdir.read_state(self.p.run_id)
            if state is not None and state.phase.final:
                if state.phase is Phase.FAILED:
                    raise NodeError(f"the head reported FAILED: {state.reason}")
                self.p.stopper.stop(f"the head ended the job: {state.reason}")
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
