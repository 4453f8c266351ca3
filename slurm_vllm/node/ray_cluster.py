"""Ray head and worker processes, token auth, and waiting for the cluster to form.

The head runs ``ray start --head --block`` in a process group the node program owns, then
watches the GCS through ONE in-process client (a cheap gRPC call every fraction of a second, no
driver, no ``ray status`` subprocess per poll) until the expected number of nodes is alive.
Workers probe the head's GCS port (a TCP connect costs nothing), then join with jittered
exponential backoff until a deadline, and confirm the join by finding their own raylet alive in
the GCS. Every wait has a deadline and names what it was waiting for when it runs out.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slurm_vllm.errors import NodeError
from slurm_vllm.node.lifecycle import OwnedProcess, Stopper

if TYPE_CHECKING:
    from slurm_vllm.node.ray_launch import Launch

Clock = Callable[[], float]
Sleep = Callable[[float], None]

#: A Ray launcher's exit code (ray_launch): the head's GCS answered but its own Ray node never
#: registered in time.
HEAD_NEVER_REGISTERED = 75


# ---------------------------------------------------------------- backoff


@dataclass
class Backoff:
    """Jittered exponential backoff: delays grow ``factor``-fold up to ``cap``.

    "Equal jitter": each delay is half the nominal value plus a random share of the other half,
    so retries of many workers spread out but never shrink to zero.
    """

    initial: float = 0.2
    factor: float = 2.0
    cap: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        nominal = min(self.cap, self.initial * self.factor ** self.attempt)
        self.attempt += 1
        return nominal / 2 + self.rng.uniform(0, nominal / 2)

    def reset(self) -> None:
        self.attempt = 0


def sleep_until_next(backoff: Backoff, deadline: float, stopper: Stopper | None,
                     clock: Clock = time.monotonic, sleep: Sleep | None = None) -> bool:
    """Wait one backoff step (never past ``deadline``); False when stopped or out of time."""
    delay = min(backoff.next_delay(), deadline - clock())
    if delay <= 0:
        return False
    if sleep is not None:
        sleep(delay)
        return not (stopper and stopper.stopped)
    if stopper is not None:
        return not stopper.wait(delay)
    time.sleep(delay)
    return True


# ---------------------------------------------------------------- environment and argv


#: Ray's raylet and workers retry their node-local socket connections (the object store, the
#: raylet) every ``raylet_client_connect_timeout_milliseconds`` (default 1000) for
#: ``raylet_client_num_connect_attempts`` (default 10) tries. A starting raylet's first try at its
#: own object store always misses, so every node paid a whole second. The same 10 s budget in
#: 100 ms steps. Left alone when the site sets either.
LOCAL_CONNECT_RETRY = {
    "RAY_raylet_client_connect_timeout_milliseconds": "100",
    "RAY_raylet_client_num_connect_attempts": "100",
}


def ray_env(base: Mapping[str, str], *, node_ip: str, interface: str | None,
            token_path: Path | None) -> dict[str, str]:
    """The environment for ``ray start``: Ray's workers inherit it, so vLLM's do too.

    Sets the node's one address for vLLM and the interface for Gloo/NCCL, turns token auth on
    with the job's token file, turns usage stats off, makes SIGTERM tear Ray down at once
    (Ray 2.5x otherwise drains for up to 30 s before stopping its processes), and retries
    node-local connections in short steps (``LOCAL_CONNECT_RETRY``).
    """
    env = dict(base)
    env.pop("RAY_ADDRESS", None)
    env.update({
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "VLLM_HOST_IP": node_ip,
    })
    if not any(k in env for k in LOCAL_CONNECT_RETRY):
        env.update(LOCAL_CONNECT_RETRY)
    if interface:
        env["GLOO_SOCKET_IFNAME"] = interface
        env["NCCL_SOCKET_IFNAME"] = interface
    if token_path is not None:
        env.pop("RAY_AUTH_TOKEN", None)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env


def count_gpus(env: Mapping[str, str]) -> int | None:
    """GPUs Slurm gave this node: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES; None: unknown."""
    value = env.get("SLURM_GPUS_ON_NODE")
    if value and value.strip().isdigit():
        return int(value)
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    return None


def count_cpus(env: Mapping[str, str]) -> int | None:
    """CPUs Slurm gave this node (so two jobs sharing a node do not both claim all of it)."""
    value = env.get("SLURM_CPUS_ON_NODE")
    return int(value) if value and value.strip().isdigit() else None


#: Longest Ray temp dir: Ray puts AF_UNIX sockets about 60 characters below it (limit 107).
TEMP_DIR_MAX = 44


def make_temp_dir(job_id: str, rank: int, root: str | None = None) -> str:
    """Create this node's Ray temp dir, fresh and private: ``/tmp/svl-u<uid>/svl-<job>-<rank>``.

    A predictable name in a world-writable directory could be created first by another user
    (Ray would then use it, and make it 0777). So the name lives under a parent only this user
    can write (:func:`private_dir`), and it is created anew each run. ``/tmp`` rather than
    ``$TMPDIR``: sites set TMPDIR to long per-job paths, and socket paths must stay short.
    """
    if root is None:
        root = "/tmp" if os.access("/tmp", os.W_OK) else tempfile.gettempdir()
    parent = f"{root}/svl-u{os.getuid()}"
    path = f"{parent}/svl-{job_id}-{rank}"
    if len(path) > TEMP_DIR_MAX:
        raise NodeError(f"Ray temp dir {path} is too long for socket paths (at most {TEMP_DIR_MAX} "
                        "characters); make /tmp writable")
    try:
        private_dir(parent)
    except NodeError:
        # Someone else took the name first: a fresh parent with an unpredictable name instead
        # (created 0700 by mkdtemp), so a squatter cannot keep this user's jobs off the node.
        path = f"{tempfile.mkdtemp(prefix=f'svl-u{os.getuid()}-', dir=root)}/svl-{job_id}-{rank}"
    shutil.rmtree(path, ignore_errors=True)  # an earlier run of this job on this node
    os.mkdir(path, 0o700)
    return path


def remove_temp_dir(path: str) -> None:
    """Remove a temp dir :func:`make_temp_dir` made, and its parent when that was a one-off."""
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    if os.path.basename(parent).startswith(f"svl-u{os.getuid()}-"):  # mkdtemp's, this run's alone
        shutil.rmtree(parent, ignore_errors=True)


def private_dir(path: str) -> str:
    """``path`` as a directory only this user can write: created 0700, or already this user's.

    Refused (NodeError) when it is a symlink, not a directory, or owned by someone else; a
    directory of ours that others could write is tightened to 0700.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NodeError(f"{path} is not a directory (a symlink or file put there first?); remove it")
    if st.st_uid != os.getuid():
        raise NodeError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): someone "
                        "created it first; ask them or the site to remove it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def sweep_stale_temp_dirs(running_job_ids: set[str], root: str = "/tmp", min_age: float = 600.0,
                          now: float | None = None) -> list[str]:
    """Remove Ray temp dirs of this user's jobs that no longer run (``svl-<job>-<rank>``).

    A node program killed by Slurm (KillWait after SIGTERM, or --kill-on-bad-exit) cannot remove
    its own temp dir; the next job on the node does. Only our own, only old ones, only of jobs
    Slurm no longer lists.
    """
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = os.listdir(root)
    except OSError:
        return removed
    for name in entries:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "svl" or not parts[2].isdigit() or parts[1] in running_job_ids:
            continue
        path = os.path.join(root, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid != os.getuid() or now - st.st_mtime < min_age:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def ray_start_args(*, node_ip: str, temp_dir: str, port_args: Sequence[str],
                   head_address: str | None = None, node_name: str | None = None,
                   num_gpus: int | None = None, num_cpus: int | None = None,
                   block: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """``ray`` arguments (``start ...``) for a head (``head_address`` None) or a worker joining
    ``head_address``; the launcher (ray_launch) runs them."""
    argv = ["start"]
    argv += ["--head"] if head_address is None else [f"--address={head_address}"]
    argv += [f"--node-ip-address={node_ip}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if node_name:
        argv.append(f"--node-name={node_name}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus}")
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    argv += list(port_args)
    argv += list(extra)
    if block:
        argv.append("--block")
    return argv


# ---------------------------------------------------------------- probes and the GCS


def tcp_open(ip: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at ip:port."""
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_gcs_open(ip: str, port: int, *, proc: OwnedProcess, timeout: float, stopper: Stopper,
                  host: str, clock: Clock = time.monotonic) -> bool:
    """Wait until the head's GCS accepts connections; False when stopped first.

    Raises NodeError if the head process exits or the deadline passes.
    """
    deadline = clock() + timeout
    while not tcp_open(ip, port, timeout=0.2):
        if not proc.running:
            raise NodeError(f"node {host}: the Ray head exited with code {proc.poll()} before its GCS "
                            f"answered on {ip}:{port}")
        if clock() > deadline:
            raise NodeError(f"node {host}: the Ray head's GCS did not open {ip}:{port} within {timeout:.0f}s")
        if stopper.wait(0.1):
            return False
    return True


@dataclass(frozen=True)
class RayNode:
    """One node as the GCS reports it."""

    node_id: str
    name: str
    hostname: str
    ip: str
    port: int
    alive: bool
    is_head: bool


class GcsWatcher:
    """One long-lived GCS client for cheap, frequent cluster queries (no driver, no subprocess).

    Creating the client blocks for up to ~40 s when the GCS does not answer, so it is built in
    a thread with a deadline, and only after a TCP probe found the port open.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None
        self.last_error: str | None = None

    def connect(self, timeout: float = 15.0) -> bool:
        if self._client is not None:
            return True
        box: dict[str, Any] = {}

        def build() -> None:
            try:
                from ray._raylet import GcsClient  # type: ignore[attr-defined]

                box["client"] = GcsClient(address=self.address)
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                box["error"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=build, name="gcs-connect", daemon=True)
        t.start()
        t.join(timeout)
        if "client" in box:
            self._client = box["client"]
            return True
        self.last_error = box.get("error", f"no answer from GCS {self.address} within {timeout:.0f}s")
        return False

    def nodes(self, timeout: float = 2.0, **alive_matching: Any) -> list[RayNode] | None:
        """Every node the GCS knows (alive and dead); None when the GCS did not answer.

        With NodeSelector fields (``is_head_node=True``, ``node_ip_address=IP``): only the alive
        nodes matching them, selected by the GCS, so the reply stays small however big the
        cluster and many nodes can ask often.
        """
        if self._client is None and not self.connect():
            return None
        query: dict[str, Any] = {}
        if alive_matching:
            from ray.core.generated.gcs_pb2 import GcsNodeInfo  # type: ignore[attr-defined]
            from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest  # type: ignore[attr-defined]

            query = {"node_selectors": [GetAllNodeInfoRequest.NodeSelector(**alive_matching)],
                     "state_filter": GcsNodeInfo.GcsNodeState.ALIVE}
        try:
            infos = self._client.get_all_node_info(timeout=timeout, **query)
        except Exception as e:  # noqa: BLE001 - RpcError, AuthenticationError, timeouts
            self.last_error = f"{type(e).__name__}: {e}"
            return None
        out = []
        for node_id, info in infos.items():
            out.append(RayNode(
                node_id=node_id.hex() if hasattr(node_id, "hex") else str(node_id),
                name=info.node_name, hostname=info.node_manager_hostname,
                ip=info.node_manager_address, port=int(info.node_manager_port),
                alive=int(info.state) == 0, is_head=bool(info.is_head_node)))
        return out


def alive_nodes(nodes: Sequence[RayNode]) -> list[RayNode]:
    return [n for n in nodes if n.alive]


def missing_hosts(expected: Sequence[str], alive: Sequence[RayNode]) -> list[str]:
    """Expected hosts with no alive node of that name (node names are Slurm host names)."""
    seen = {n.name for n in alive} | {n.hostname.split(".")[0] for n in alive}
    return [h for h in expected if h not in seen]


class ClusterTimeout(NodeError):
    """The head's deadline passed before every node joined; names the missing hosts."""

    def __init__(self, joined: int, expected: int, missing: Sequence[str], waited: float) -> None:
        self.joined, self.expected, self.missing = joined, expected, list(missing)
        who = ", ".join(self.missing) if self.missing else "unknown hosts"
        super().__init__(f"only {joined}/{expected} nodes joined the Ray cluster within {waited:.0f}s; "
                         f"missing: {who}")


class NodeSource(Protocol):
    """What reads the cluster's nodes: :class:`GcsWatcher`, or the head's child (node/gcs_watch.py)."""

    last_error: str | None

    def nodes(self, timeout: float = 2.0) -> list[RayNode] | None: ...


def wait_for_nodes(
    watcher: NodeSource,
    *,
    expected: int,
    hosts: Sequence[str],
    timeout: float,
    stopper: Stopper,
    head: OwnedProcess | None = None,
    on_progress: Callable[[int, list[str]], None] | None = None,
    poll: float = 0.2,
    clock: Clock = time.monotonic,
    started_at: float | None = None,
) -> list[RayNode] | None:
    """Poll the GCS until ``expected`` nodes are alive; None if stopped; raise on deadline.

    ``on_progress(k, missing)`` is called whenever the alive count changes (and once at first).
    ``started_at`` (clock time) is when the whole wait began, for the message on timeout.
    """
    start = clock() if started_at is None else started_at
    deadline = clock() + timeout
    last: int | None = None
    alive: list[RayNode] = []
    while True:
        if stopper.stopped:
            return None
        if head is not None and not head.running:
            raise NodeError(f"the Ray head process exited (code {head.poll()}) while waiting for nodes")
        nodes = watcher.nodes(timeout=max(0.2, min(2.0, deadline - clock())))
        if nodes is not None:
            alive = alive_nodes(nodes)
            if len(alive) != last:
                last = len(alive)
                if on_progress:
                    on_progress(len(alive), missing_hosts(hosts[: max(expected, 0)], alive))
            if len(alive) >= expected:
                return alive
        if clock() >= deadline:
            raise ClusterTimeout(len(alive), expected, missing_hosts(hosts[:expected], alive), clock() - start)
        stopper.wait(poll)


# ---------------------------------------------------------------- worker join


class HeadUnreachable(NodeError):
    """A worker gave up: the head never answered or went away."""


@dataclass
class JoinResult:
    proc: OwnedProcess
    attempts: int
    seconds: float


def join_cluster(
    *,
    start: Callable[[float], Launch],
    head_host: str,
    head_ip: str,
    gcs_port: int,
    timeout: float,
    stopper: Stopper,
    log: Callable[[str], None],
    terminate: Callable[[OwnedProcess], None],
    backoff: Backoff | None = None,
    probe_backoff: Backoff | None = None,
    attempt_timeout: float = 60.0,
    clock: Clock = time.monotonic,
    started_at: float | None = None,
) -> JoinResult | None:
    """Join the head at ``head_ip:gcs_port`` before the deadline; None when stopped first.

    Probes the GCS port with TCP connects (free) until it answers, then each attempt hands the
    order to a Ray launcher (``start(seconds_left)``, see ray_launch): it waits until the head's
    own raylet is registered (``ray start --address`` reads that record first and re-polls for
    it only every 2 s), says "started" and runs ``ray start --address --block``, and says
    "joined" once this node's raylet is alive in the GCS. An attempt whose launcher exits, or
    that does not join within ``attempt_timeout`` of starting, is retried after a jittered,
    growing delay.
    """
    backoff = backoff or Backoff()
    # Probing a closed port costs a SYN and a RST: poll it more often than we retry ray start.
    probe_backoff = probe_backoff or Backoff(initial=0.05, cap=0.5, rng=backoff.rng)
    t0 = started_at if started_at is not None else clock()
    deadline = t0 + timeout
    address = f"{head_ip}:{gcs_port}"
    attempts = 0
    said_waiting = False
    last_why = ""
    while True:
        if stopper.stopped:
            return None
        if clock() >= deadline:
            if not attempts:
                raise HeadUnreachable(f"head {head_host} never answered at {address} within {timeout:.0f}s")
            raise HeadUnreachable(f"could not join head {head_host} at {address} within {timeout:.0f}s "
                                  f"({attempts} attempt(s); the last one {last_why})")
        if not tcp_open(head_ip, gcs_port):
            if not said_waiting:
                log(f"waiting for the head {head_host} at {address}")
                said_waiting = True
            sleep_until_next(probe_backoff, deadline, stopper, clock)
            continue
        probe_backoff.reset()
        attempts += 1
        log(f"joining {address} (attempt {attempts}): ray start runs once the head's raylet is registered")
        launch = start(deadline - clock())
        attempt_end = deadline  # until ray start begins; then attempt_timeout more
        joined = False
        while not stopper.stopped and clock() < attempt_end:
            event = launch.next_event(min(0.5, attempt_end - clock()))
            if event == "started":
                attempt_end = min(deadline, clock() + attempt_timeout)
                log("the head's raylet is registered; ray start is running")
            elif event == "joined":
                joined = True
                break
            elif event == "":
                launch.wait_exit(2.0)  # the launcher is gone: let its exit code arrive
                break
        launch.close()
        if joined:
            return JoinResult(launch.proc, attempts, clock() - t0)
        if stopper.stopped:
            # The node's own teardown stops this launcher with everything else, inside Slurm's
            # KillWait; a separate wait here would spend that budget twice.
            return None
        code = launch.proc.poll()
        terminate(launch.proc)
        if code == HEAD_NEVER_REGISTERED:
            raise HeadUnreachable(f"head {head_host}'s GCS answered at {address} but its own Ray node never "
                                  f"registered within {timeout:.0f}s")
        last_why = why = f"exited with code {code}" if code is not None else "did not register in time"
        log(f"join attempt {attempts} {why}" + ("; retrying" if clock() < deadline else ""))
        sleep_until_next(backoff, deadline, stopper, clock)
