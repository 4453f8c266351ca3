"""The Ray launcher: Ray's own CLI without the Serve/Jobs imports, run now or on an order."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from slurm_vllm.node import ray_launch
from slurm_vllm.node.ray_launch import HEAD_NEVER_REGISTERED, Launch, Launches, launcher_argv

pytest.importorskip("ray")


def spawn(env: dict[str, str] | None = None) -> Launch:
    return Launch.spawn("ray-worker", dict(os.environ) if env is None else env, stdout=subprocess.PIPE)


def output(launch: Launch) -> str:
    out = launch.proc.popen.stdout
    assert out is not None
    text = out.read().decode()
    launch.proc.popen.wait(timeout=60)
    return text


def events(launch: Launch) -> list[str]:
    words = []
    while (word := launch.next_event(60)) not in ("", None):
        words.append(word)
    return words


def test_runs_rays_cli_without_the_serve_and_jobs_subcommands():
    out = subprocess.run([*launcher_argv(), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    commands = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert {"start", "stop", "status"} <= commands
    assert not {"serve", "job"} & commands


def test_end_of_input_before_any_order_starts_nothing(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert ray_launch.main([]) == 0


def test_an_ordered_launcher_says_started_then_runs_the_arguments():
    launch = spawn()
    launch.order(["--version"])
    assert events(launch) == ["started"]
    assert "ray, version" in output(launch) and launch.proc.poll() == 0


def test_a_launcher_closed_before_its_order_exits_having_run_nothing():
    launch = spawn()
    launch.close()
    assert output(launch) == "" and launch.proc.poll() == 0


def test_a_head_that_never_registers_ends_the_launcher_with_its_own_code():
    launch = spawn()
    launch.order(["--version"], await_head="127.0.0.1:9", timeout=2)  # nothing listens on port 9
    assert events(launch) == []  # never "started"
    assert "did not register at 127.0.0.1:9 within 2s" in output(launch)
    assert launch.proc.poll() == HEAD_NEVER_REGISTERED


def test_launches_reuse_the_waiting_launcher_once_and_only_with_the_same_env():
    env = dict(os.environ)
    launches = Launches(lambda e: spawn(dict(e)), env)
    first = launches.next(env)
    assert first is launches.all[0]  # the one spawned ahead serves the first attempt
    first.order(["--version"])
    second = launches.next(env)
    assert second is not first  # an ordered launcher is used up
    third = launches.next(dict(env, VLLM_HOST_IP="10.9.9.9"))
    assert third is not second and len(launches.all) == 3  # Ray reads some of its env at import
    launches.close()
    for launch in launches.all:
        output(launch)
