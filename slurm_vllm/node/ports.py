"""A per-job port plan for Ray and the vLLM API, so two jobs on one node do not collide.

Ray's defaults (GCS 6379, client server 10001, dashboard 8265, agent 52365, workers
10002-19999) are the same for every job: a second job on a shared node fails to bind or, worse,
joins the wrong cluster. Here each job gets a block of ports derived from its job id (and the
node's rank), every candidate is bind-tested, and a taken one is skipped. The block lies below
Linux's ephemeral range (32768+) so outgoing connections do not steal it, and above Ray's
default worker range.

A bind test alone cannot keep two jobs apart: Ray's worker ports are bound minutes after the
plan, when vLLM starts its workers, so a second job would find them free. So the node program
also *claims* its slot for as long as it runs (an abstract Unix socket named after the slot:
visible to every user of the node's network namespace, released by the kernel when the process
dies, never left behind), and co-resident jobs' plans are disjoint by construction. Every
named port is tested again right before the process that binds it starts (:meth:`PortPlan.taken`).
"""

from __future__ import annotations

import socket
import sys
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

from slurm_vllm.errors import NodeError

#: Ports this module never hands out: Ray's and vLLM's well-known defaults.
RESERVED = frozenset({6379, 8000, 8265, 10001, 52365})

REGION_START = 20000
REGION_END = 32700  # exclusive; Linux's ephemeral range starts at 32768
BLOCK = 100  # ports per slot
NAMED_AREA = 16  # named ports (and spares for taken ones) at the start of a block
WORKER_PORTS = BLOCK - NAMED_AREA  # Ray worker processes bind one port each
SLOTS = (REGION_END - REGION_START) // BLOCK
RANK_STRIDE = 37  # ranks of one job land in different slots (useful when nodes share a host)

NAMED = (
    "gcs",
    "node_manager",
    "object_manager",
    "ray_client_server",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "runtime_env_agent",
    "metrics_export",
    "dashboard",
    "api",
    "front",
    "router",
    "router_metrics",
    "preflight",
)

#: The named ports a process of the job binds for as long as it runs, the ones
#: :meth:`PortPlan.taken` tests again before use. ``preflight`` is not one: the pre-flight
#: all-reduce's rendezvous on the head binds it for a moment, before anything else starts, and
#: may leave it in TIME_WAIT for a minute after (node/preflight.py).
HELD = tuple(n for n in NAMED if n != "preflight")


@dataclass(frozen=True)
class PortPlan:
    """The ports one node uses; the head publishes ``gcs`` and ``api`` in head.json."""

    gcs: int
    node_manager: int
    object_manager: int
    ray_client_server: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    metrics_export: int
    dashboard: int
    api: int
    front: int  # with replicas, on rank 0: the authenticating front, the job's public URL
    router: int  # vllm-router, loopback only
    router_metrics: int  # vllm-router's Prometheus exporter, loopback only
    preflight: int  # on rank 0: the pre-flight all-reduce's rendezvous (torch.distributed's store)
    min_worker: int
    max_worker: int

    def ray_start_args(self, head: bool) -> list[str]:
        """``ray start`` flags for this plan (the dashboard UI is off)."""
        args = [
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            f"--min-worker-port={self.min_worker}",
            f"--max-worker-port={self.max_worker}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
            f"--metrics-export-port={self.metrics_export}",
        ]
        if head:
            # Ray still runs a minimal dashboard process (usage stats) with the UI off; its port
            # defaults to 8265 for everyone, so it gets a job-local one too.
            args = [f"--port={self.gcs}", f"--ray-client-server-port={self.ray_client_server}",
                    "--include-dashboard=false", f"--dashboard-port={self.dashboard}", *args]
        return args

    @property
    def mp_master_port(self) -> int:
        """vLLM's own rendezvous port for ``--backend mp`` (no Ray then, so the GCS port is free)."""
        return self.gcs

    @property
    def api_port(self) -> int:
        return self.api

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def taken(self, names: tuple[str, ...] = HELD, is_free: Callable[[int], bool] | None = None) -> list[int]:
        """The ports among ``names`` that something on this node holds now."""
        free = is_free or port_is_free
        return [getattr(self, n) for n in names if not free(getattr(self, n))]


def port_is_free(port: int) -> bool:
    """True when nothing on this node holds ``port`` (TCP bind test on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


#: Slots this process holds (slot -> the socket whose name claims it).
_CLAIMS: dict[int, socket.socket] = {}


def claim_slot(slot: int) -> bool:
    """Claim ``slot`` on this node for this process's lifetime; False when a live job holds it.

    The claim is an abstract Unix socket (Linux): it needs no file, any user sees it, and it
    vanishes with the process, so a killed job never blocks a slot. Elsewhere every slot is
    claimable (the bind tests still apply).
    """
    if slot in _CLAIMS or not sys.platform.startswith("linux"):
        return True
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0slurm_vllm/port-slot/{REGION_START}/{slot}")
    except OSError:
        sock.close()
        return False
    _CLAIMS[slot] = sock
    return True


def release_slot(slot: int) -> None:
    sock = _CLAIMS.pop(slot, None)
    if sock is not None:
        sock.close()


def job_slot(job_id: str, rank: int = 0) -> int:
    """The job's first-choice slot: consecutive job ids get consecutive slots."""
    base = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return (base + RANK_STRIDE * rank) % SLOTS


def _fill_slot(start: int, fixed: dict[str, int], is_free: Callable[[int], bool]) -> PortPlan | None:
    chosen: dict[str, int] = {}
    used = set(fixed.values())
    candidates = iter(range(start, start + NAMED_AREA))
    for name in NAMED:
        if name in fixed:
            chosen[name] = fixed[name]
            continue
        for port in candidates:
            if port not in RESERVED and port not in used and is_free(port):
                chosen[name] = port
                break
        else:
            return None
    lo, hi = start + NAMED_AREA, start + BLOCK - 1
    if any(p in used or p in RESERVED or not is_free(p) for p in range(lo, hi + 1)):
        return None
    return PortPlan(min_worker=lo, max_worker=hi, **chosen)


def plan_ports(
    job_id: str,
    rank: int = 0,
    *,
    api_port: int | None = None,
    gcs_port: int | None = None,
    front_port: int | None = None,
    is_free: Callable[[int], bool] = port_is_free,
    claim: Callable[[int], bool] | None = None,
    host: str = "?",
) -> PortPlan:
    """Choose this node's ports; fixed ports the user asked for are checked, not moved.

    ``claim`` (the node program passes :func:`claim_slot`) must accept a slot before it is used;
    a slot it refuses is held by another job on this node. Raises NodeError when a requested
    port is taken or no slot has room.
    """
    fixed: dict[str, int] = {}
    for name, port in (("api", api_port), ("gcs", gcs_port), ("front", front_port)):
        if port is not None:
            if not is_free(port):
                raise NodeError(f"node {host}: port {port} ({name}) is already in use here; "
                                "choose another or leave it unset to plan one per job")
            fixed[name] = port
    first = job_slot(job_id, rank)
    for i in range(SLOTS):
        slot = (first + i) % SLOTS
        if claim is not None and not claim(slot):
            continue
        plan = _fill_slot(REGION_START + slot * BLOCK, fixed, is_free)
        if plan is not None:
            return plan
        if claim is not None:
            release_slot(slot)
    raise NodeError(f"node {host}: no free block of {BLOCK} ports in {REGION_START}-{REGION_END - 1}")
