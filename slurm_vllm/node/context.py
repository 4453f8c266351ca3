"""The one context the node program hands to the serving step: spec, job run, topology, ports,
environment and the stop switch. Its own module so that both sides import the same type."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from slurm_vllm.jobdir import JobDir, Run
from slurm_vllm.node import lifecycle
from slurm_vllm.node.lifecycle import OwnedProcess, Stopper
from slurm_vllm.node.ports import PortPlan
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec

#: Test/debug aid: the head holds the formed cluster until signalled instead of serving.
ENV_NO_SERVE = "SLURM_VLLM_NODE_NO_SERVE"

@dataclass
class NodeContext:
    """What the serving step (serve.py) gets from the node program (program.py): one typed record.

    ``env`` is the environment for processes this node starts (it already carries
    ``RAY_ADDRESS``, the token settings, ``VLLM_HOST_IP`` and the Gloo/NCCL interface).
    The serving step must return when ``stop_event`` is set; ``fail(reason)`` ends the job FAILED.
    The ports, the rank and the addresses are read from here, never guessed.
    """

    spec: ServeSpec
    jobdir: JobDir
    run: Run
    topology: Topology
    ports: PortPlan
    env: dict[str, str]
    stopper: Stopper
    ray_address: str | None
    temp_dir: str
    log: Callable[[str], None] = lifecycle.log
    owned: list[OwnedProcess] = field(default_factory=list)
    #: What vLLM loads: this node's staged copy of the model (node/staging.py); None: the spec's model.
    model_path: str | None = None
    # Copied from the topology for the serving step's convenience.
    rank: int = field(init=False)
    num_nodes: int = field(init=False)
    head_host: str = field(init=False)
    head_ip: str = field(init=False)
    ip: str = field(init=False)  # this node's own address (the one Ray, vLLM and NCCL use)

    def __post_init__(self) -> None:
        t = self.topology
        self.rank, self.num_nodes, self.head_host, self.head_ip, self.ip = (
            t.rank, t.num_nodes, t.head_host, t.head_ip, t.node_ip)

    @property
    def stop_event(self) -> threading.Event:
        """Set once the node stops (a signal, a failure, the head's end)."""
        return self.stopper.event

    @property
    def stop_reason(self) -> str | None:
        return self.stopper.reason

    def fail(self, reason: str) -> None:
        self.stopper.fail(reason)


def hold(ctx: NodeContext, why: str) -> int:
    """Keep the formed cluster until the job is signalled (test/debug aid; also the fallback)."""
    ctx.log(why)
    ctx.stop_event.wait()
    return 0
