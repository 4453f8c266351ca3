"""The pre-flight checks one node runs on itself before vLLM starts (node/preflight.py runs them).

Each check is a pure function of what it is given (the topology, the environment, a
``statvfs``, a device listing, paths) and returns one :class:`~slurm_vllm.jobdir.PreflightCheck`:
``ok``, ``warn`` (logged and recorded, the job goes on) or ``fail`` (the job ends FAILED with
the check's detail as its diagnosis, before vLLM starts). Every detail names what was found and
what was expected, so the diagnosis reads without the code: ``GPUs visible 1, asked 2``.
Together they cost milliseconds: no subprocess but one ``ip addr``, no import of torch or Ray.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from slurm_vllm.jobdir import CheckStatus, PreflightCheck
from slurm_vllm.node.ports import PortPlan, port_is_free
from slurm_vllm.node.topology import IfAddr, Topology, interface_of

MiB = 1024 * 1024
GiB = 1024 * MiB

#: The folder vLLM's and NCCL's shared memory live in; a test aid may point the check elsewhere.
SHM_DIR = "/dev/shm"
ENV_SHM_DIR = "SLURM_VLLM_SHM_DIR"

#: /dev/shm below this per local worker, plus SHM_FAIL_BASE, cannot hold vLLM's shared-memory
#: queue between a node's workers (10 chunks of 10 MiB) beside NCCL's buffers: the job would die
#: with a "Bus error" while loading. A container's default /dev/shm (64 MiB) is below it.
SHM_FAIL_PER_WORKER = 64 * MiB
SHM_FAIL_BASE = 64 * MiB
#: Below this per local worker (and below 1 GiB) it may still work, with less room for Ray's
#: object store (which then moves to /tmp, slower) and for NCCL's transport buffers: warn.
SHM_WARN_PER_WORKER = 512 * MiB
SHM_WARN_MIN = 1 * GiB

#: Linux's limit for an AF_UNIX socket path (sun_path is 108 bytes with the final NUL); Ray
#: refuses a longer one when it starts.
AF_UNIX_MAX = 107
#: The longest socket path Ray makes under its temp dir, without the session's PID:
#: ``/session_YYYY-mm-dd_HH-MM-SS_ffffff_<pid>/sockets/plasma_store``.
RAY_SOCKET_TAIL = len("/session_2000-01-01_00-00-00_000000_") + len("/sockets/plasma_store")

#: Device files that count GPUs when no ``*_VISIBLE_DEVICES`` variable says which are ours.
NVIDIA_DEVICES = "/dev/nvidia[0-9]*"
_VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def _check(node: str, name: str, status: CheckStatus, detail: str) -> PreflightCheck:
    return PreflightCheck(node=node, check=name, status=status, detail=detail)


def size_text(n: float) -> str:
    """``64 MiB``, ``1.5 GiB``: sizes as a diagnosis shows them."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def workers_per_node(tp: int, pp: int, nodes_per_replica: int) -> int:
    """vLLM's worker processes on one node: TP x PP spread over the nodes of one replica."""
    return max(1, math.ceil(tp * pp / max(nodes_per_replica, 1)))


# ---------------------------------------------------------------- network


def check_address(topo: Topology, addrs: Sequence[IfAddr], route_source: Callable[[str], str]) -> PreflightCheck:
    """The chosen address is this node's, reachable by others, and the one the route to the head
    leaves from (Ray, vLLM and Gloo/NCCL all use it)."""
    where = f"{topo.node_ip} on {topo.interface}"
    if interface_of(topo.node_ip, addrs) is None:
        return _check(topo.hostname, "address", "fail", f"address {topo.node_ip} is on no interface here "
                      f"(found {', '.join(f'{a.name}={a.ip}' for a in addrs) or 'none'})")
    loopback = topo.node_ip.startswith("127.")
    if loopback and topo.num_nodes > 1:
        return _check(topo.hostname, "address", "fail", f"address {where} is loopback: the other nodes cannot "
                      "reach it; set network.interface or network.cidr to the cluster's network")
    if topo.is_head or topo.head_ip == topo.node_ip:
        return _check(topo.hostname, "address", "ok", where)
    try:
        src = route_source(topo.head_ip)
    except OSError as e:
        return _check(topo.hostname, "address", "fail", f"no route to the head {topo.head_host} "
                      f"({topo.head_ip}) from {where}: {e}")
    if src != topo.node_ip:
        return _check(topo.hostname, "address", "warn", f"{where}, but the route to the head {topo.head_host} "
                      f"({topo.head_ip}) leaves from {src} ({interface_of(src, addrs) or '?'}); set "
                      "network.interface on a network that reaches the head")
    return _check(topo.hostname, "address", "ok", f"{where}; route to the head {topo.head_host} ({topo.head_ip})")


def check_ports(host: str, ports: PortPlan, is_free: Callable[[int], bool] = port_is_free) -> PreflightCheck:
    """The planned ports (named and Ray's worker range) are still free.

    A port taken since the plan is a warning: Ray's ports are planned again right before
    ``ray start`` and vLLM's API port is tested again before ``vllm serve`` (which fails then).
    """
    taken = ports.taken(is_free=is_free)
    taken += [p for p in range(ports.min_worker, ports.max_worker + 1) if not is_free(p)]
    if taken:
        return _check(host, "ports", "warn", f"port(s) {', '.join(map(str, taken))} of this job's plan were taken "
                      "since it was made: planned again before use")
    return _check(host, "ports", "ok", f"planned ports free (API {ports.api}, GCS {ports.gcs}, "
                  f"workers {ports.min_worker}-{ports.max_worker})")


# ---------------------------------------------------------------- this node's resources


def shm_dir(env: Mapping[str, str]) -> str:
    return env.get(ENV_SHM_DIR) or SHM_DIR


def check_shm(host: str, workers: int, path: str = SHM_DIR,
              statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> PreflightCheck:
    """/dev/shm's free space against what ``workers`` vLLM workers on this node need.

    Fails below ``SHM_FAIL_BASE + SHM_FAIL_PER_WORKER x workers`` (clearly too small), warns
    below ``max(SHM_WARN_MIN, SHM_WARN_PER_WORKER x workers)``.
    """
    try:
        st = statvfs(path)
    except OSError as e:
        return _check(host, "shm", "fail", f"{path} is missing here ({e.strerror or e}): vLLM and NCCL keep their "
                      "shared memory there")
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    need_fail = SHM_FAIL_BASE + SHM_FAIL_PER_WORKER * workers
    need_warn = max(SHM_WARN_MIN, SHM_WARN_PER_WORKER * workers)
    found = f"{path} has {size_text(free)} free of {size_text(total)}"
    for_what = f"{workers} vLLM worker(s) on this node"
    if free < need_fail:
        return _check(host, "shm", "fail", f"{found}; {for_what} need at least {size_text(need_fail)} (ask the site "
                      "for a larger /dev/shm, or run the container with the host's /dev/shm)")
    if free < need_warn:
        return _check(host, "shm", "warn", f"{found}; {for_what} should have {size_text(need_warn)}")
    return _check(host, "shm", "ok", f"{found}")


def pid_digits(read: Callable[[], str] | None = None) -> int:
    """Digits of the largest PID on this node (``/proc/sys/kernel/pid_max``); 7 when unknown."""
    try:
        text = read() if read is not None else Path("/proc/sys/kernel/pid_max").read_text()
        return len(str(max(int(text.strip()) - 1, 1)))
    except (OSError, ValueError):
        return 7


def check_temp_dir(host: str, temp_dir: str, digits: int) -> PreflightCheck:
    """Ray's socket paths under its temp dir fit AF_UNIX's 107 bytes, with this node's PIDs
    (a fail: Ray would refuse to start) and with any 7-digit PID (a warning: the session name
    comes from the head's Ray PID, on another node)."""
    base = len(temp_dir.encode())
    longest, worst = base + RAY_SOCKET_TAIL + digits, base + RAY_SOCKET_TAIL + 7
    found = f"Ray temp dir {temp_dir}: socket paths up to {longest} bytes"
    if longest > AF_UNIX_MAX:
        return _check(host, "temp_dir", "fail", f"{found}, over AF_UNIX's {AF_UNIX_MAX}; make /tmp writable "
                      "so the short default is used")
    if worst > AF_UNIX_MAX:
        return _check(host, "temp_dir", "warn", f"{found}; {worst} with a 7-digit PID on the head, over "
                      f"AF_UNIX's {AF_UNIX_MAX}")
    return _check(host, "temp_dir", "ok", f"{found} (limit {AF_UNIX_MAX})")


def visible_gpus(env: Mapping[str, str], devices: Callable[[], list[str]] | None = None) -> tuple[int, str]:
    """(GPUs this node's processes can use, where that count comes from).

    A ``*_VISIBLE_DEVICES`` variable (Slurm sets it for a GRES request) is the authority; else
    the NVIDIA device files.
    """
    for name in _VISIBLE_VARS:
        value = env.get(name)
        if value is not None:
            ids = [d.strip() for d in value.split(",")]
            count = len([d for d in ids if d and d != "-1" and d != "NoDevFiles"])
            return count, f"{name}={value}"
    found = sorted(d for d in (devices() if devices is not None else glob.glob(NVIDIA_DEVICES))
                   if re.fullmatch(r"nvidia\d+", os.path.basename(d)))
    return len(found), f"{len(found)} /dev/nvidiaN device(s), no CUDA_VISIBLE_DEVICES"


def check_gpus(host: str, asked: int, env: Mapping[str, str],
               devices: Callable[[], list[str]] | None = None) -> tuple[PreflightCheck, int]:
    """GPUs visible on this node against ``gpus_per_node``; also returns the visible count."""
    count, source = visible_gpus(env, devices)
    if asked <= 0:
        return _check(host, "gpus", "ok", f"CPU node (gpus_per_node 0); GPUs visible {count}"), count
    if count < asked:
        return _check(host, "gpus", "fail", f"GPUs visible {count}, asked {asked} ({source})"), count
    if count > asked:
        return _check(host, "gpus", "warn", f"GPUs visible {count}, asked {asked} ({source}): vLLM may use GPUs "
                      "Slurm did not give this job"), count
    return _check(host, "gpus", "ok", f"GPUs visible {count}, asked {asked} ({source})"), count


# ---------------------------------------------------------------- the model


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def check_model(host: str, model: str, local: bool) -> tuple[PreflightCheck, str]:
    """The model is readable here; returns the check and its fingerprint for the head to compare
    across nodes: the sha256 of ``config.json`` (a single-file model: ``size:<bytes>``)."""
    if not local:
        return _check(host, "model", "ok", f"{model} is a hub id: vLLM fetches it (or reads its cache)"), ""
    path = Path(model)
    try:
        if path.is_file():
            if not os.access(path, os.R_OK):
                return _check(host, "model", "fail", f"model file {path} is not readable here"), ""
            size = path.stat().st_size
            return _check(host, "model", "ok", f"model file {path} readable ({size_text(size)})"), f"size:{size}"
        if not path.is_dir():
            return _check(host, "model", "fail", f"model path {path} does not exist on this node (is its "
                          "filesystem mounted here?)"), ""
        if not os.access(path, os.R_OK | os.X_OK):
            return _check(host, "model", "fail", f"model directory {path} is not readable here"), ""
        config = path / "config.json"
        if not config.is_file():
            return _check(host, "model", "warn", f"model directory {path} has no config.json"), ""
        digest = file_sha256(config)
    except OSError as e:
        return _check(host, "model", "fail", f"model {path} cannot be read here: {e.strerror or e}"), ""
    return _check(host, "model", "ok", f"{config} sha256 {digest[:12]}"), digest
