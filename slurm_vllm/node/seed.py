"""``leader`` / ``worker``: a drop-in for vLLM's ``multi-node-serving.sh``.

Same flags (``--ray_port``, ``--ray_cluster_size``, ``--ray_init_timeout``, ``--ray_address``,
also spelled with dashes; anything else goes to ``ray start``) and the same exit codes: the
leader exits 0 once N nodes are alive and leaves the head running for the ``vllm serve`` that
follows it, 1 on timeout; a worker stays attached, retries joining until the timeout and exits
1 after it. What changes is how: the leader polls the GCS through one client a few times a
second instead of a fresh ``ray.init()`` every 5 s, workers probe the head and back off with
jitter instead of sleeping 5 s, every node gets an explicit ``--node-ip-address`` (the route
to the head), and a failed or interrupted start tears down only its own processes. Works on
plain hosts as well as inside Slurm.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from slurm_vllm.errors import NodeError
from slurm_vllm.node import lifecycle, ray_cluster, topology
from slurm_vllm.node.lifecycle import OwnedProcess, Stopper
from slurm_vllm.node.ray_launch import Launch, Launches, launcher_argv

DEFAULT_PORT = 6379  # the seed's default; only used when the user runs the drop-in
DEFAULT_TIMEOUT = 300.0


@dataclass
class SeedArgs:
    """The seed's flags; ``extra`` goes to ``ray start`` verbatim."""

    ray_port: int = DEFAULT_PORT
    ray_init_timeout: float = DEFAULT_TIMEOUT
    ray_cluster_size: int | None = None
    ray_address: str | None = None
    extra: list[str] = field(default_factory=list)


def _has_flag(extra: Sequence[str], flag: str) -> str | None:
    """Value of ``--flag=V`` / ``--flag V`` among the pass-through args, else None."""
    for i, a in enumerate(extra):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(extra):
            return extra[i + 1]
    return None


def leader_ip(extra: Sequence[str], env: Mapping[str, str]) -> tuple[str, str | None]:
    """The head's address: ``--node-ip-address`` if given, else the non-loopback address its
    own host name resolves to, else the first non-loopback address."""
    given = _has_flag(extra, "--node-ip-address") or env.get(topology.ENV_NODE_IP)
    addrs = topology.ipv4_interfaces()
    if given:
        return given, topology.interface_of(given, addrs)
    try:
        own = topology.resolve_ipv4(socket.gethostname())
    except OSError:
        own = None
    return topology.select_node_ip(host=socket.gethostname(), head_ip=own, addrs=addrs)


def worker_ip(head: str, extra: Sequence[str], env: Mapping[str, str]) -> tuple[str, str, str | None]:
    """(head IP, this node's IP on the route to it, its interface)."""
    try:
        head_ip = topology.resolve_ipv4(head)
    except OSError as e:
        raise NodeError(f"cannot resolve the head address {head!r}: {e}") from None
    given = _has_flag(extra, "--node-ip-address") or env.get(topology.ENV_NODE_IP)
    addrs = topology.ipv4_interfaces()
    if given:
        return head_ip, given, topology.interface_of(given, addrs)
    ip, iface = topology.select_node_ip(host=socket.gethostname(), head_ip=head_ip, addrs=addrs,
                                        allow_loopback=True)
    return head_ip, ip, iface


def _env(base: Mapping[str, str], ip: str, iface: str | None) -> dict[str, str]:
    # No token is forced here: the seed has none; RAY_AUTH_MODE/RAY_AUTH_TOKEN* from the
    # caller's environment pass through to Ray and to our GCS client alike.
    return ray_cluster.ray_env(base, node_ip=ip, interface=iface, token_path=None)


def _extra_without_ip(extra: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in extra:
        if skip:
            skip = False
            continue
        if a.startswith("--node-ip-address="):
            continue
        if a == "--node-ip-address":
            skip = True
            continue
        out.append(a)
    return out


def _missing(argument: str) -> int:
    lifecycle.log(f"error: missing argument {argument}")
    return 1


def _stopper() -> Stopper:
    """The drop-in's signal handling: a stop request for SIGTERM/SIGUSR2/SIGINT/SIGHUP."""
    stopper = Stopper()
    lifecycle.install_signal_handlers(stopper)
    return stopper


def run_leader(args: SeedArgs, env: Mapping[str, str] | None = None) -> int:
    """Start the head, wait for ``ray_cluster_size`` alive nodes; 0 on success, 1 otherwise."""
    log = lifecycle.log
    env = dict(os.environ if env is None else env)
    if not args.ray_cluster_size:
        return _missing("--ray_cluster_size")
    stopper = _stopper()
    head: OwnedProcess | None = None
    try:
        ip, iface = leader_ip(args.extra, env)
        renv = _env(env, ip, iface)
        argv = [*launcher_argv(), "start", "--head", f"--port={args.ray_port}",
                f"--node-ip-address={ip}", "--disable-usage-stats", *_extra_without_ip(args.extra), "--block"]
        log(f"leader: starting the Ray head on {ip}:{args.ray_port}")
        # The head outlives this command by design (vllm serve runs after it): not tied to us.
        head = OwnedProcess("ray-head", argv, renv, outlive_parent=True)
        os.environ.update({k: v for k, v in renv.items() if k.startswith("RAY_AUTH")})
        if not ray_cluster.wait_gcs_open(ip, args.ray_port, proc=head, timeout=args.ray_init_timeout,
                                         stopper=stopper, host=socket.gethostname()):
            raise NodeError(f"stopped ({stopper.reason}) before the head came up")
        watcher = ray_cluster.GcsWatcher(f"{ip}:{args.ray_port}")
        n = args.ray_cluster_size

        def progress(k: int, _missing: list[str]) -> None:
            log(f"leader: {k}/{n} Ray nodes alive")

        alive = ray_cluster.wait_for_nodes(watcher, expected=n, hosts=[], timeout=args.ray_init_timeout,
                                           stopper=stopper, head=head, on_progress=progress)
        if alive is None:
            raise NodeError(f"stopped ({stopper.reason}) before {n} nodes joined")
        log(f"leader: all {n} Ray nodes are alive; the head keeps running (pid {head.pid})")
        return 0  # the head stays up for the `vllm serve` that follows, as with the seed script
    except NodeError as e:
        log(f"leader: {e}")
        if head is not None:
            lifecycle.terminate([head], grace=10.0, log_fn=log)
        return 1


def run_worker(args: SeedArgs, env: Mapping[str, str] | None = None) -> int:
    """Join ``ray_address:ray_port`` with backoff until the timeout; stay attached.

    Returns 1 when the head never answered in time or went away later, 0 when stopped by a
    signal after joining.
    """
    log = lifecycle.log
    env = dict(os.environ if env is None else env)
    if not args.ray_address:
        return _missing("--ray_address")
    stopper = _stopper()
    lifecycle.become_subreaper()
    owned: list[OwnedProcess] = []
    try:
        head_ip, ip, iface = worker_ip(args.ray_address, args.extra, env)
        renv = _env(env, ip, iface)
        ray_args = ["start", f"--address={head_ip}:{args.ray_port}", f"--node-ip-address={ip}",
                    "--disable-usage-stats", *_extra_without_ip(args.extra), "--block"]

        def spawn(e: Mapping[str, str]) -> Launch:
            launch = Launch.spawn("ray-worker", e, stdout=None)
            owned.append(launch.proc)
            return launch

        launches = Launches(spawn, renv)  # imports Ray's CLI while the head comes up

        def start(seconds_left: float) -> Launch:
            launch = launches.next(renv)
            launch.order(ray_args, await_head=f"{head_ip}:{args.ray_port}", timeout=seconds_left,
                         node=(ip, None))
            return launch

        def stop(p: OwnedProcess) -> None:
            lifecycle.terminate([p], grace=5.0, log_fn=log)
            if p in owned:
                owned.remove(p)

        joined = ray_cluster.join_cluster(
            start=start, head_host=args.ray_address, head_ip=head_ip, gcs_port=args.ray_port,
            timeout=args.ray_init_timeout, stopper=stopper, log=log, terminate=stop)
        if joined is None:
            return 0
        log(f"worker: joined {head_ip}:{args.ray_port} as {ip} in {joined.seconds:.1f}s")
        while not stopper.wait(1.0):
            if not joined.proc.running:
                raise NodeError(f"head {args.ray_address} went away: the local raylet exited "
                                f"with code {joined.proc.poll()}")
        return 0
    except NodeError as e:
        log(f"worker: {e}")
        return 1
    finally:
        lifecycle.terminate(owned, grace=10.0, log_fn=log)
