"""Topology from Slurm's variables, with a fake resolver, route and interface table."""

from __future__ import annotations

import pytest

from slurm_vllm.errors import NodeError
from slurm_vllm.node import topology
from slurm_vllm.node.topology import IfAddr, discover, expand_hostlist, select_node_ip

ADDRS = [IfAddr("lo", "127.0.0.1", 8), IfAddr("eth0", "10.0.0.5", 24), IfAddr("ib0", "10.10.0.5", 16)]
HOSTS = {"gpu01": "10.0.0.4", "gpu02": "10.0.0.5", "gpu03": "10.0.0.6"}


def env(rank: int = 1, n: int = 3, nodelist: str = "gpu[01-03]") -> dict[str, str]:
    return {"SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank), "SLURM_JOB_NUM_NODES": str(n),
            "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "777"}


def no_scontrol(argv: list[str]) -> str:
    raise OSError("scontrol missing")


def fake_route(dest: str) -> str:
    # gpu02 reaches the 10.0.0.0/24 network through eth0.
    assert dest.startswith("10.0.0.")
    return "10.0.0.5"


def test_discover_uses_route_source_and_first_host_as_head():
    t = discover(env(), hostname="gpu02", run=no_scontrol, resolve=HOSTS.__getitem__, addrs=ADDRS,
                 route_source=fake_route)
    assert (t.rank, t.num_nodes, t.job_id) == (1, 3, "777")
    assert t.hosts == ("gpu01", "gpu02", "gpu03")
    assert (t.head_host, t.head_ip) == ("gpu01", "10.0.0.4")
    assert (t.node_ip, t.interface) == ("10.0.0.5", "eth0")
    assert not t.is_head


def test_scontrol_output_is_the_authority():
    calls = []

    def run(argv: list[str]) -> str:
        calls.append(argv)
        return "nodeB\nnodeA\n"

    t = discover(env(rank=0, n=2, nodelist="node[A-B]"), hostname="nodeB", run=run,
                 resolve=lambda h: "10.0.0.5", addrs=ADDRS, route_source=fake_route)
    assert calls == [["scontrol", "show", "hostnames", "node[A-B]"]]
    assert t.head_host == "nodeB"


def test_interface_and_cidr_override_the_route():
    t = discover(env(), hostname="gpu02", run=no_scontrol, resolve=HOSTS.__getitem__, addrs=ADDRS,
                 route_source=fake_route, interface="ib0")
    assert (t.node_ip, t.interface) == ("10.10.0.5", "ib0")
    t = discover(env(), hostname="gpu02", run=no_scontrol, resolve=HOSTS.__getitem__, addrs=ADDRS,
                 route_source=fake_route, cidr="10.10.0.0/16")
    assert (t.node_ip, t.interface) == ("10.10.0.5", "ib0")


def test_missing_interface_names_node_and_what_was_found():
    with pytest.raises(NodeError) as e:
        discover(env(), hostname="gpu02", run=no_scontrol, resolve=HOSTS.__getitem__, addrs=ADDRS,
                 route_source=fake_route, interface="ib9")
    msg = str(e.value)
    assert "gpu02" in msg and "ib9" in msg and "eth0=10.0.0.5/24" in msg


def test_no_cidr_match_fails():
    with pytest.raises(NodeError, match="gpu02.*192.168.0.0/16"):
        discover(env(), hostname="gpu02", run=no_scontrol, resolve=HOSTS.__getitem__, addrs=ADDRS,
                 route_source=fake_route, cidr="192.168.0.0/16")


def test_unresolvable_head_names_it():
    def resolve(h: str) -> str:
        raise OSError("Name or service not known")

    with pytest.raises(NodeError, match="gpu02.*head host 'gpu01'"):
        discover(env(), hostname="gpu02", run=no_scontrol, resolve=resolve, addrs=ADDRS, route_source=fake_route)


def test_missing_slurm_variables_are_named():
    with pytest.raises(NodeError, match="SLURM_NODEID"):
        discover({"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "a,b"}, hostname="a", run=no_scontrol,
                 resolve=lambda h: "10.0.0.5", addrs=ADDRS, route_source=fake_route)
    with pytest.raises(NodeError, match="node count"):
        discover({"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a"}, hostname="a", run=no_scontrol,
                 resolve=lambda h: "10.0.0.5", addrs=ADDRS, route_source=fake_route)


def test_rank_outside_node_count_fails():
    with pytest.raises(NodeError, match="rank 3"):
        discover(env(rank=3), hostname="gpu02", run=no_scontrol, resolve=HOSTS.__getitem__, addrs=ADDRS,
                 route_source=fake_route)


def test_head_whose_name_resolves_to_loopback_publishes_a_real_address():
    # Debian's /etc/hosts maps the own host name to 127.0.1.1; the head must not publish that.
    t = discover(env(rank=0), hostname="gpu01", run=no_scontrol, resolve=lambda h: "127.0.1.1",
                 addrs=ADDRS, route_source=lambda d: "127.0.0.1")
    assert t.node_ip == "10.0.0.5" and t.head_ip == "10.0.0.5" and t.interface == "eth0"


def test_only_loopback_on_a_multi_node_job_is_an_error():
    with pytest.raises(NodeError, match="no usable IPv4 address"):
        select_node_ip(host="n1", head_ip="10.0.0.4", addrs=[IfAddr("lo", "127.0.0.1", 8)],
                       route_source=lambda d: "127.0.0.1")


def test_override_accepts_any_loopback_address_for_local_tests():
    ip, iface = select_node_ip(host="n1", head_ip="127.0.0.2", addrs=ADDRS, override="127.0.0.3")
    assert (ip, iface) == ("127.0.0.3", "lo")
    with pytest.raises(NodeError, match="not an address of this node"):
        select_node_ip(host="n1", head_ip="127.0.0.2", addrs=ADDRS, override="10.9.9.9")


def test_retarget_recomputes_the_route_to_the_published_head():
    t = discover(env(), hostname="gpu02", run=no_scontrol, resolve=HOSTS.__getitem__, addrs=ADDRS,
                 route_source=fake_route)
    t2 = topology.retarget(t, "10.10.0.4", env={}, addrs=ADDRS, route_source=lambda d: "10.10.0.5")
    assert (t2.head_ip, t2.node_ip, t2.interface) == ("10.10.0.4", "10.10.0.5", "ib0")


@pytest.mark.parametrize("expr, hosts", [
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("a,b[1,3-4],c", ["a", "b1", "b3", "b4", "c"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("127.0.0.2,127.0.0.3", ["127.0.0.2", "127.0.0.3"]),
])
def test_expand_hostlist(expr: str, hosts: list[str]):
    assert expand_hostlist(expr) == hosts


def test_parse_ip_addr_output():
    out = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
           "5: veth0@if6    inet 10.77.0.2/24 brd 10.77.0.255 scope global veth0\\ ...\n")
    assert topology._parse_ip_addr(out) == [IfAddr("lo", "127.0.0.1", 8), IfAddr("veth0", "10.77.0.2", 24)]


def test_real_interfaces_and_route_on_this_machine():
    addrs = topology.ipv4_interfaces()
    assert any(a.ip == "127.0.0.1" for a in addrs)
    assert topology.route_source_ip("127.0.0.1") == "127.0.0.1"
