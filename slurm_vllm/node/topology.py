"""Where this node sits in the allocation: rank, node count, head host, and its own address.

Every node must use ONE address consistently — for ``ray start --node-ip-address``, for
``VLLM_HOST_IP`` and for the Gloo/NCCL interface — and that address must be the one the head can
reach. So the address is not "the first non-loopback IP" but the source address of this node's
route to the head (unless the spec names an interface or a CIDR). Everything here is a pure
function of the environment, a resolver and the interface table, so unit tests can feed fakes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from slurm_vllm.errors import NodeError, SlurmVllmError

#: Debug/test aid: force this node's address (the interface is looked up from it).
ENV_NODE_IP = "SLURM_VLLM_NODE_IP"


@dataclass(frozen=True)
class IfAddr:
    """One IPv4 address on one interface."""

    name: str
    ip: str
    prefixlen: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/{self.prefixlen}", strict=False)


@dataclass(frozen=True)
class Topology:
    """What one node knows about the job's layout once discovery succeeded."""

    job_id: str
    rank: int
    num_nodes: int
    hostname: str
    hosts: tuple[str, ...]
    head_host: str
    head_ip: str
    node_ip: str
    interface: str

    @property
    def is_head(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """One line for the node log: enough to debug a stuck start from the log alone."""
        return (
            f"job {self.job_id} rank {self.rank}/{self.num_nodes} host {self.hostname} "
            f"ip {self.node_ip} ({self.interface}); head {self.head_host} ({self.head_ip}); "
            f"nodes {','.join(self.hosts)}"
        )


# ---------------------------------------------------------------- Slurm variables


def _int_env(env: Mapping[str, str], names: Sequence[str], what: str, host: str) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(str(value).strip())
            except ValueError:
                raise NodeError(f"node {host}: {name}={value!r} is not an integer ({what})") from None
    raise NodeError(
        f"node {host}: none of {', '.join(names)} is set; cannot tell the {what} "
        "(is this running inside an srun step?)"
    )


def rank_from_env(env: Mapping[str, str], host: str = "?") -> int:
    """This node's index in the step: SLURM_NODEID (one task per node), else SLURM_PROCID."""
    return _int_env(env, ("SLURM_NODEID", "SLURM_PROCID"), "node rank", host)


def num_nodes_from_env(env: Mapping[str, str], host: str = "?") -> int:
    """How many nodes must join: the step's node count when known, else the job's."""
    return _int_env(env, ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), "node count", host)


def job_id_from_env(env: Mapping[str, str]) -> str:
    return str(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "nojob")


def nodelist_from_env(env: Mapping[str, str], host: str = "?") -> str:
    """The step's node list (rank 0 is its first host), else the job's."""
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            return str(env[name])
    raise NodeError(f"node {host}: SLURM_JOB_NODELIST is not set; cannot find the head node")


def _split_top_level(expr: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(body: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(item)
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm host list (``gpu[01-03,7],login``) in Python.

    Used when ``scontrol`` is not on PATH (plain hosts, unit tests); ``scontrol show hostnames``
    stays the authority when it is available.
    """
    hosts: list[str] = []
    for part in _split_top_level(expr):
        m = re.search(r"\[([^\]]+)\]", part)
        if not m:
            hosts.append(part)
            continue
        prefix, suffix = part[: m.start()], part[m.end():]
        for mid in _expand_ranges(m.group(1)):
            hosts.extend(expand_hostlist(prefix + mid + suffix))
    return hosts


Runner = Callable[[list[str]], str]


def _run_scontrol(argv: list[str]) -> str:
    """Through the one Slurm runner (slurm.py): same timeouts and error words as the login side."""
    from slurm_vllm import slurm  # noqa: PLC0415 - only when Slurm is asked

    return slurm.run(argv, timeout=30).stdout


def slurm_hostnames(nodelist: str, run: Runner | None = None) -> list[str]:
    """``scontrol show hostnames NODELIST``, or the Python expansion when scontrol is absent/fails."""
    if run is None and shutil.which("scontrol") is None:
        return expand_hostlist(nodelist)
    try:
        out = (run or _run_scontrol)(["scontrol", "show", "hostnames", nodelist])
    except (OSError, subprocess.SubprocessError, SlurmVllmError):
        return expand_hostlist(nodelist)
    hosts = [h.strip() for h in out.splitlines() if h.strip()]
    return hosts or expand_hostlist(nodelist)


# ---------------------------------------------------------------- addresses

Resolver = Callable[[str], str]


def resolve_ipv4(host: str) -> str:
    """The host's IPv4 address as this node's resolver sees it (DNS, /etc/hosts)."""
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no IPv4 address for {host}")
    return str(infos[0][4][0])


def route_source_ip(dest_ip: str) -> str:
    """The source address the kernel picks to reach ``dest_ip`` (UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((dest_ip, 9))
        return str(s.getsockname()[0])


def _parse_ip_addr(out: str) -> list[IfAddr]:
    addrs = []
    for line in out.splitlines():
        m = re.search(r"^\d+:\s+(\S+)\s+inet\s+(\d+\.\d+\.\d+\.\d+)/(\d+)", line)
        if m:
            addrs.append(IfAddr(m.group(1).split("@")[0], m.group(2), int(m.group(3))))
    return addrs


def _ioctl_addrs() -> list[IfAddr]:
    import fcntl
    import struct

    addrs = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            packed = struct.pack("256s", name.encode()[:15])
            try:
                ip = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, packed)[20:24])  # SIOCGIFADDR
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x891B, packed)[20:24])  # SIOCGIFNETMASK
            except OSError:
                continue
            addrs.append(IfAddr(name, ip, ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen))
    return addrs


def ipv4_interfaces() -> list[IfAddr]:
    """Every IPv4 address of this node with its interface (``ip -o -4 addr``, else ioctl)."""
    if shutil.which("ip"):
        try:
            out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
            addrs = _parse_ip_addr(out)
            if addrs:
                return addrs
        except (OSError, subprocess.SubprocessError):
            pass
    return _ioctl_addrs()


def interface_of(ip: str, addrs: Sequence[IfAddr]) -> str | None:
    """The interface holding ``ip``; any 127.x address counts as the loopback interface's."""
    for a in addrs:
        if a.ip == ip:
            return a.name
    if _is_loopback(ip):
        for a in addrs:
            if _is_loopback(a.ip) and ipaddress.IPv4Address(ip) in a.network:
                return a.name
    return None


def _is_loopback(ip: str) -> bool:
    return ipaddress.IPv4Address(ip).is_loopback


def _fmt_addrs(addrs: Sequence[IfAddr]) -> str:
    return ", ".join(f"{a.name}={a.ip}/{a.prefixlen}" for a in addrs) or "none"


def select_node_ip(
    *,
    host: str,
    head_ip: str | None,
    addrs: Sequence[IfAddr],
    interface: str | None = None,
    cidr: str | None = None,
    override: str | None = None,
    route_source: Callable[[str], str] = route_source_ip,
    allow_loopback: bool = False,
) -> tuple[str, str]:
    """Pick (ip, interface) for this node; raise NodeError naming what was found otherwise.

    Order: explicit override (debug aid), spec.network.interface, spec.network.cidr, the source
    address of the route to the head, then (head only, when its name resolves to loopback) the
    first non-loopback address.
    """
    if override:
        name = interface_of(override, addrs)
        if name is None:
            raise NodeError(f"node {host}: {ENV_NODE_IP}={override} is not an address of this node "
                            f"(found {_fmt_addrs(addrs)})")
        return override, name
    if interface:
        for a in addrs:
            if a.name == interface:
                return a.ip, a.name
        raise NodeError(f"node {host}: network.interface={interface!r} has no IPv4 address here "
                        f"(found {_fmt_addrs(addrs)})")
    if cidr:
        try:
            net = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as e:
            raise NodeError(f"node {host}: network.cidr={cidr!r} is not a CIDR: {e}") from None
        for a in addrs:
            if ipaddress.IPv4Address(a.ip) in net:
                return a.ip, a.name
        raise NodeError(f"node {host}: no address in network.cidr={cidr} here (found {_fmt_addrs(addrs)})")
    if head_ip is not None and not _is_loopback(head_ip):
        try:
            src = route_source(head_ip)
        except OSError as e:
            raise NodeError(f"node {host}: no route to the head at {head_ip}: {e} "
                            f"(addresses here: {_fmt_addrs(addrs)})") from None
        name = interface_of(src, addrs)
        if name is not None and (allow_loopback or not _is_loopback(src)):
            return src, name
    # The head's own name resolved to loopback (Debian's 127.0.1.1 convention), or the route
    # source is not a local address: take the first non-loopback address, if there is one.
    for a in addrs:
        if not _is_loopback(a.ip):
            return a.ip, a.name
    if allow_loopback:
        for a in addrs:
            return a.ip, a.name
    raise NodeError(f"node {host}: found no usable IPv4 address towards the head "
                    f"({head_ip or 'unresolved'}); addresses here: {_fmt_addrs(addrs)}; "
                    "set network.interface or network.cidr")


def discover(
    env: Mapping[str, str] | None = None,
    *,
    interface: str | None = None,
    cidr: str | None = None,
    hostname: str | None = None,
    run: Runner | None = None,
    resolve: Resolver = resolve_ipv4,
    addrs: Sequence[IfAddr] | None = None,
    route_source: Callable[[str], str] = route_source_ip,
) -> Topology:
    """Build this node's :class:`Topology` from Slurm's variables; NodeError names what failed."""
    env = os.environ if env is None else env
    host = hostname or socket.gethostname().split(".")[0]
    rank = rank_from_env(env, host)
    n = num_nodes_from_env(env, host)
    hosts = tuple(slurm_hostnames(nodelist_from_env(env, host), run))
    if not hosts:
        raise NodeError(f"node {host}: the node list is empty")
    if rank < 0 or rank >= n:
        raise NodeError(f"node {host}: rank {rank} is outside 0..{n - 1}")
    if len(hosts) < n:
        raise NodeError(f"node {host}: node list {','.join(hosts)} has fewer than {n} hosts")
    head_host = hosts[0]
    try:
        head_ip = resolve(head_host)
    except OSError as e:
        raise NodeError(f"node {host}: cannot resolve the head host {head_host!r}: {e}") from None
    addrs = list(addrs) if addrs is not None else ipv4_interfaces()
    override = env.get(ENV_NODE_IP) or None
    ip, iface = select_node_ip(host=host, head_ip=head_ip, addrs=addrs, interface=interface, cidr=cidr,
                               override=override, route_source=route_source, allow_loopback=n == 1)
    if rank == 0 and _is_loopback(head_ip):
        head_ip = ip  # the head publishes the address it really uses
    return Topology(job_id=job_id_from_env(env), rank=rank, num_nodes=n, hostname=host, hosts=hosts,
                    head_host=head_host, head_ip=head_ip, node_ip=ip, interface=iface)


def retarget(topo: Topology, head_ip: str, *, interface: str | None = None, cidr: str | None = None,
             env: Mapping[str, str] | None = None, addrs: Sequence[IfAddr] | None = None,
             route_source: Callable[[str], str] = route_source_ip) -> Topology:
    """Recompute a worker's own address once the head has published the IP it really uses."""
    if head_ip == topo.head_ip:
        return topo
    env = os.environ if env is None else env
    addrs = list(addrs) if addrs is not None else ipv4_interfaces()
    ip, iface = select_node_ip(host=topo.hostname, head_ip=head_ip, addrs=addrs, interface=interface,
                               cidr=cidr, override=env.get(ENV_NODE_IP) or None, route_source=route_source,
                               allow_loopback=topo.num_nodes == 1)
    return replace(topo, head_ip=head_ip, node_ip=ip, interface=iface)
