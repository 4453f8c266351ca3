"""A per-job port plan for Ray and the vLLM API, so two jobs on one node do not collide.

Ray's defaults (GCS 6379, client server 10001, dashboard 8265, agent 52365, workers
10002-19999) are the same for every job: a second job on a shared node fails to bind or, worse,
joins the wrong cluster. Here each job gets a block of ports derived from its job id (and the
node's rank), every candidate is bind-tested, and a taken one is skipped. The block lies below
Linux's ephemeral range (32768+) so outgoing connections do not steal it, and above Ray's
default worker range.
"""

from __future__ import annotations

import socket
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
)


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


def port_is_free(port: int) -> bool:
    """True when nothing on this node holds ``port`` (TCP bind test on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


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
    is_free: Callable[[int], bool] = port_is_free,
    host: str = "?",
) -> PortPlan:
    """Choose this node's ports; fixed ports the user asked for are checked, not moved.

    Raises NodeError when a requested port is taken or no slot has room.
    """
    fixed: dict[str, int] = {}
    for name, port in (("api", api_port), ("gcs", gcs_port)):
        if port is not None:
            if not is_free(port):
                raise NodeError(f"node {host}: port {port} ({name}) is already in use here; "
                                "choose another or leave it unset to plan one per job")
            fixed[name] = port
    first = job_slot(job_id, rank)
    for i in range(SLOTS):
        slot = (first + i) % SLOTS
        plan = _fill_slot(REGION_START + slot * BLOCK, fixed, is_free)
        if plan is not None:
            return plan
    raise NodeError(f"node {host}: no free block of {BLOCK} ports in {REGION_START}-{REGION_END - 1}")
