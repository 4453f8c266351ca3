"""The seed's flags (underscores or dashes) and the node entry's arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slurm_vllm.node import cli
from slurm_vllm.node.cli import LEADER_FLAGS, WORKER_FLAGS, parse_seed_args


def test_leader_flags_as_the_seed_writes_them():
    a = parse_seed_args(["--ray_port=6379", "--ray_cluster_size=3", "--ray_init_timeout=120",
                         "--num-gpus=2", "--resources", '{"x": 1}'], LEADER_FLAGS)
    assert (a.ray_port, a.ray_cluster_size, a.ray_init_timeout) == (6379, 3, 120.0)
    assert a.extra == ["--num-gpus=2", "--resources", '{"x": 1}']


def test_dashes_and_separate_values_are_accepted():
    a = parse_seed_args(["--ray-port", "7000", "--ray-cluster-size=2", "--ray-init-timeout", "5"], LEADER_FLAGS)
    assert (a.ray_port, a.ray_cluster_size, a.ray_init_timeout) == (7000, 2, 5.0)
    assert a.extra == []


def test_worker_flags_and_defaults():
    a = parse_seed_args(["--ray_address=10.0.0.1", "--object-store-memory=1000000"], WORKER_FLAGS)
    assert (a.ray_address, a.ray_port, a.ray_init_timeout) == ("10.0.0.1", 6379, 300.0)
    assert a.extra == ["--object-store-memory=1000000"]


def test_leader_flag_is_not_a_worker_flag():
    a = parse_seed_args(["--ray_address=h", "--ray_cluster_size=2"], WORKER_FLAGS)
    assert a.extra == ["--ray_cluster_size=2"]


def test_bad_number_is_refused():
    with pytest.raises(SystemExit, match="expects a number"):
        parse_seed_args(["--ray_cluster_size=two"], LEADER_FLAGS)


def test_missing_required_flags_exit_1_like_the_seed():
    assert cli.leader_main(["--ray_port=6379"]) == 1
    assert cli.worker_main(["--ray_port=6379"]) == 1


def test_help_is_fast_and_imports_no_ray():
    code = ("import sys; from slurm_vllm.node import cli; cli.leader_main(['--help']); cli.worker_main(['-h']); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--ray_cluster_size=N" in out.stdout and "--ray_address=HEAD" in out.stdout


def test_node_entry_requires_job_dir(capsys):
    with pytest.raises(SystemExit) as e:
        cli.node_main([])
    assert e.value.code == 2
    assert "--job-dir" in capsys.readouterr().err


def test_node_entry_on_a_directory_without_spec_fails_with_a_reason(tmp_path, capsys):
    assert cli.node_main(["--job-dir", str(tmp_path)]) == 1
    assert "no spec.json" in capsys.readouterr().out
