"""A node's pre-flight checks on itself, each fed fakes: interfaces, routes, statvfs, devices, paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from slurm_vllm.node import checks
from slurm_vllm.node.checks import GiB, MiB
from slurm_vllm.node.ports import plan_ports
from slurm_vllm.node.topology import IfAddr, Topology

ADDRS = [IfAddr("lo", "127.0.0.1", 8), IfAddr("eth0", "10.0.0.5", 24), IfAddr("ib0", "10.10.0.5", 16)]


def topo(rank: int = 1, ip: str = "10.0.0.5", iface: str = "eth0", n: int = 2) -> Topology:
    return Topology(job_id="77", rank=rank, num_nodes=n, hostname=f"gpu0{rank + 1}",
                    hosts=tuple(f"gpu0{i + 1}" for i in range(n)), head_host="gpu01", head_ip="10.0.0.4",
                    node_ip=ip, interface=iface)


def route(src: str):
    return lambda dest: src


def no_route(dest: str) -> str:
    raise OSError(101, "Network is unreachable")


# ---------------------------------------------------------------- address


def test_address_ok_names_ip_interface_and_the_head():
    c = checks.check_address(topo(), ADDRS, route("10.0.0.5"))
    assert (c.node, c.check, c.status) == ("gpu02", "address", "ok")
    assert c.detail == "10.0.0.5 on eth0; route to the head gpu01 (10.0.0.4)"


def test_address_on_loopback_fails_when_other_nodes_must_reach_it():
    c = checks.check_address(topo(ip="127.0.0.1", iface="lo"), ADDRS, route("10.0.0.5"))
    assert c.status == "fail"
    assert c.detail.startswith("address 127.0.0.1 on lo is loopback: the other nodes cannot reach it")
    assert checks.check_address(topo(rank=0, ip="127.0.0.1", iface="lo", n=1), ADDRS, no_route).status == "ok"


def test_no_route_to_the_head_fails_and_another_route_warns():
    c = checks.check_address(topo(), ADDRS, no_route)
    assert c.status == "fail" and "no route to the head gpu01 (10.0.0.4) from 10.0.0.5 on eth0" in c.detail
    c = checks.check_address(topo(ip="10.10.0.5", iface="ib0"), ADDRS, route("10.0.0.5"))
    assert c.status == "warn" and "leaves from 10.0.0.5 (eth0)" in c.detail


def test_an_address_on_no_interface_fails():
    c = checks.check_address(topo(ip="10.9.9.9"), ADDRS, route("10.9.9.9"))
    assert c.status == "fail" and c.detail.startswith("address 10.9.9.9 is on no interface here")


# ---------------------------------------------------------------- ports


def test_ports_free_and_taken():
    plan = plan_ports("77", 1, is_free=lambda p: True)
    assert checks.check_ports("n", plan, is_free=lambda p: True).status == "ok"
    c = checks.check_ports("n", plan, is_free=lambda p: p not in (plan.api, plan.min_worker))
    assert c.status == "warn" and f"port(s) {plan.api}, {plan.min_worker} of this job's plan" in c.detail


def test_the_preflight_port_is_not_among_the_ports_tested_before_use():
    # The all-reduce's rendezvous may sit in TIME_WAIT after it ran: that must not replan Ray's ports.
    plan = plan_ports("77", 0, is_free=lambda p: True)
    assert plan.taken(is_free=lambda p: p != plan.preflight) == []


# ---------------------------------------------------------------- /dev/shm


def fake_statvfs(free: int, total: int | None = None):
    def statvfs(path: str) -> os.statvfs_result:
        assert path == "/dev/shm"
        total_ = total or free
        return os.statvfs_result((4096, 4096, total_ // 4096, free // 4096, free // 4096, 0, 0, 0, 0, 255))
    return statvfs


def test_shm_thresholds_scale_with_the_workers_on_the_node():
    assert checks.workers_per_node(8, 2, 2) == 8 and checks.workers_per_node(1, 3, 3) == 1
    assert checks.workers_per_node(2, 1, 1) == 2
    ok = checks.check_shm("n", 2, statvfs=fake_statvfs(8 * GiB, 16 * GiB))
    assert ok.status == "ok" and ok.detail == "/dev/shm has 8.0 GiB free of 16.0 GiB"
    warn = checks.check_shm("n", 1, statvfs=fake_statvfs(512 * MiB))
    assert warn.status == "warn" and warn.detail.endswith("1 vLLM worker(s) on this node should have 1.0 GiB")
    assert checks.check_shm("n", 8, statvfs=fake_statvfs(3 * GiB)).status == "warn"  # 8 x 512 MiB
    fail = checks.check_shm("n", 2, statvfs=fake_statvfs(64 * MiB))  # a container's default
    assert fail.status == "fail"
    assert fail.detail.startswith("/dev/shm has 64 MiB free of 64 MiB; 2 vLLM worker(s) on this node need at "
                                  "least 192 MiB")


def test_missing_shm_fails():
    def missing(path: str) -> os.statvfs_result:
        raise FileNotFoundError(2, "No such file or directory")
    c = checks.check_shm("n", 1, statvfs=missing)
    assert c.status == "fail" and c.detail.startswith("/dev/shm is missing here (No such file or directory)")


def test_shm_dir_test_aid():
    assert checks.shm_dir({}) == "/dev/shm"
    assert checks.shm_dir({checks.ENV_SHM_DIR: "/tmp/small"}) == "/tmp/small"


# ---------------------------------------------------------------- Ray temp dir


def test_temp_dir_socket_paths_against_af_unix():
    assert checks.pid_digits(lambda: "32768\n") == 5 and checks.pid_digits(lambda: "4194304") == 7
    assert checks.pid_digits(lambda: "junk") == 7
    c = checks.check_temp_dir("n", "/tmp/svl-u1000/svl-123-0", 5)
    assert c.status == "ok" and "socket paths up to 86 bytes" in c.detail
    long = "/tmp/" + "x" * 38  # 43 bytes: 43 + 57 + 5 = 105 here, 107 with 7 digits
    assert checks.check_temp_dir("n", long, 5).status == "ok"
    assert checks.check_temp_dir("n", long + "y", 5).status == "warn"  # 108 with a 7-digit head PID
    fail = checks.check_temp_dir("n", long + "yyy", 7)
    assert fail.status == "fail" and "over AF_UNIX's 107" in fail.detail


# ---------------------------------------------------------------- GPUs


def test_gpus_counted_from_cuda_visible_devices_first():
    c, n = checks.check_gpus("labnode2", 2, {"CUDA_VISIBLE_DEVICES": "0"}, devices=lambda: ["/dev/nvidia0"] * 8)
    assert (c.status, n) == ("fail", 1)
    assert c.detail == "GPUs visible 1, asked 2 (CUDA_VISIBLE_DEVICES=0)"
    c, n = checks.check_gpus("n", 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert (c.status, n) == ("ok", 2)
    assert checks.check_gpus("n", 1, {"CUDA_VISIBLE_DEVICES": ""})[0].status == "fail"
    assert checks.visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"})[0] == 0


def test_gpus_from_device_files_without_the_variable():
    devices = lambda: ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]  # noqa: E731
    c, n = checks.check_gpus("n", 2, {}, devices=devices)
    assert (c.status, n) == ("ok", 2) and "2 /dev/nvidiaN device(s)" in c.detail
    c, _ = checks.check_gpus("n", 1, {}, devices=devices)
    assert c.status == "warn" and "vLLM may use GPUs Slurm did not give this job" in c.detail
    c, _ = checks.check_gpus("n", 4, {}, devices=lambda: [])
    assert c.status == "fail" and c.detail.startswith("GPUs visible 0, asked 4")


def test_cpu_nodes_ask_no_gpus():
    c, n = checks.check_gpus("n", 0, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert (c.status, n) == ("ok", 2) and c.detail == "CPU node (gpus_per_node 0); GPUs visible 2"


# ---------------------------------------------------------------- the model


def test_model_directory_fingerprint_is_config_json_sha256(tmp_path: Path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    c, fp = checks.check_model("n", str(model), local=True)
    assert c.status == "ok" and fp == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert c.detail == f"{model / 'config.json'} sha256 {fp[:12]}"


def test_model_missing_unreadable_or_without_config(tmp_path: Path):
    c, fp = checks.check_model("labnode3", str(tmp_path / "nope"), local=True)
    assert (c.status, fp) == ("fail", "")
    assert c.detail == f"model path {tmp_path / 'nope'} does not exist on this node (is its filesystem mounted here?)"
    (tmp_path / "empty").mkdir()
    c, fp = checks.check_model("n", str(tmp_path / "empty"), local=True)
    assert (c.status, fp) == ("warn", "") and c.detail.endswith("has no config.json")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        if not os.access(locked, os.R_OK):  # root reads everything
            assert checks.check_model("n", str(locked), local=True)[0].detail.endswith("is not readable here")
    finally:
        locked.chmod(0o700)


def test_single_file_model_and_hub_ids(tmp_path: Path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    c, fp = checks.check_model("n", str(f), local=True)
    assert (c.status, fp) == ("ok", "size:10")
    c, fp = checks.check_model("n", "org/model", local=False)
    assert (c.status, fp) == ("ok", "") and "hub id" in c.detail
