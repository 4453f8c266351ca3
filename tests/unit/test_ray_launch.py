"""The ray launcher: Ray's own CLI without the Serve/Jobs imports, started now or on a word."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from slurm_vllm.node import ray_launch
from slurm_vllm.node.lifecycle import OwnedProcess
from slurm_vllm.node.ray_launch import WarmRayStart, launcher_argv

pytest.importorskip("ray")


def waiting_launcher(env: dict[str, str]) -> OwnedProcess:
    return OwnedProcess("ray-worker", launcher_argv(), env, stdout=subprocess.PIPE, stdin=subprocess.PIPE)


def output(proc: OwnedProcess) -> str:
    assert proc.popen.stdout is not None
    out = proc.popen.stdout.read().decode()
    proc.popen.wait(timeout=60)
    return out


def test_runs_rays_cli_without_the_serve_and_jobs_subcommands():
    out = subprocess.run([*launcher_argv(), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    commands = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert {"start", "stop", "status"} <= commands
    assert not {"serve", "job"} & commands


def test_end_of_input_before_any_arguments_starts_nothing(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert ray_launch.main([]) == 0


def test_waiting_launcher_runs_the_arguments_it_is_handed():
    env = dict(os.environ)
    warm = WarmRayStart(waiting_launcher(env), env)
    proc = warm.hand_over([*launcher_argv(), "--version"], env)
    assert proc is not None and proc.argv[-1] == "--version"
    assert "ray, version" in output(proc) and proc.poll() == 0
    assert warm.hand_over([*launcher_argv(), "--version"], env) is None  # only once


@pytest.mark.parametrize("why", ["other env", "not the launcher"])
def test_waiting_launcher_is_released_unused_when_it_cannot_serve(why):
    env = dict(os.environ)
    proc = waiting_launcher(env)
    warm = WarmRayStart(proc, env)
    if why == "other env":
        assert warm.hand_over([*launcher_argv(), "--version"], dict(env, VLLM_HOST_IP="10.9.9.9")) is None
    else:
        assert warm.hand_over(["/usr/bin/ray", "--version"], env) is None
    assert output(proc) == "" and proc.poll() == 0  # exited on end of input, ran nothing


def test_ray_command_prefers_the_launcher_when_this_python_has_ray():
    assert ray_launch.ray_command() == launcher_argv()
