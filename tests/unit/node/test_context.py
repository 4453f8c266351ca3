"""The context the node program hands to the serving step reads the way serve.py expects."""

from __future__ import annotations

import threading

from slurm_vllm.jobdir import JobDir, Run
from slurm_vllm.node import serve
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import Stopper
from slurm_vllm.node.ports import plan_ports
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec


def make_ctx(tmp_path, port=None) -> NodeContext:
    spec = ServeSpec("org/m", nodes=2, gpus_per_node=1, port=port)
    topo = Topology(job_id="77", rank=1, num_nodes=2, hostname="n2", hosts=("n1", "n2"), head_host="n1",
                    head_ip="10.0.0.1", node_ip="10.0.0.2", interface="eth0")
    stopper = Stopper()
    ports = plan_ports("77", 1, api_port=port, is_free=lambda p: True)
    return NodeContext(spec=spec, jobdir=JobDir(tmp_path), run=Run("77"), topology=topo, ports=ports,
                       env={"RAY_ADDRESS": "10.0.0.1:20100"}, stopper=stopper,
                       ray_address="10.0.0.1:20100", temp_dir="/tmp/x")


def test_serving_step_reads_ports_addresses_and_rank(tmp_path):
    ctx = make_ctx(tmp_path)
    assert (ctx.rank, ctx.num_nodes, ctx.head_host, ctx.head_ip, ctx.ip) == (1, 2, "n1", "10.0.0.1", "10.0.0.2")
    assert serve.api_port(ctx) == ctx.ports.api
    assert serve.ray_address(ctx) == "10.0.0.1:20100"
    assert serve.master_port(ctx) == ctx.ports.gcs
    assert make_ctx(tmp_path, port=8123).ports.api == 8123


def test_stop_and_fail_reach_the_serving_step(tmp_path):
    ctx = make_ctx(tmp_path)
    assert isinstance(ctx.stop_event, threading.Event) and not ctx.stop_event.is_set()
    ctx.fail("node n2 left")
    assert ctx.stop_event.is_set() and ctx.stop_reason == "node n2 left" and ctx.stopper.failed


def test_the_serving_step_loads_the_staged_copy_the_context_names(tmp_path):
    ctx = make_ctx(tmp_path)
    assert ctx.model_path is None
    assert serve.serve_argv(ctx, host="h", port=1, backend="ray", shutdown_timeout=None)[2] == "org/m"
    ctx.model_path = str(tmp_path / "staged")
    argv = serve.serve_argv(ctx, host="h", port=1, backend="ray", shutdown_timeout=None)
    assert argv[2] == str(tmp_path / "staged") and argv[argv.index("--served-model-name") + 1] == "org/m"
