"""Real vLLM (CPU build) across real Slurm lab nodes: Ray PP=2, the mp backend, failure, cancel.

Every job is prepared by the library (``prepare_job``) and submitted with plain ``sbatch``, so
what runs is exactly the rendered script users get. The lab's CPU settings come from one
place, ``scripts/lab/profile.yaml``. One vLLM server runs at a time (the lab machine has two
cores): each test cancels its job and waits for it to leave the queue before the next starts.

Run alone with ``pytest -m vllm tests/lab``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import (
    Lab,
    assert_no_processes,
    job_processes,
    kill_then_back,
    lab_cache_dir,
    read_state,
    sbatch,
    scancel,
    serve_pids,
    wait_for,
    wait_gone,
)

pytestmark = [pytest.mark.lab, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "scripts" / "lab" / "profile.yaml"
READY_TIMEOUT = 420  # a cold start on the lab's 2 cores: Ray ~15 s, vLLM 60-100 s, compile cache misses
PROMPT = [{"role": "user", "content": "Say hello to the world."}]
#: Tokens of the completion in flight when the time-limit warning comes (max-model-len is 256).
LONG_COMPLETION = 200
#: Proxy variables pointing at a port nothing listens on (the discard port).
DEAD_PROXY = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
#: Temperature-0 answers by configuration, for the cross-check between backends.
ANSWERS: dict[str, str] = {}


def lab_spec(lab: Lab, job_dir: Path, **flags: Any) -> Any:
    """A spec for the lab: the lab profile plus the flags of one test."""
    from slurm_vllm.spec import build_spec

    base: dict[str, Any] = {
        "model": str(lab.model), "nodes": 2, "gpus_per_node": 1, "mem": "5000M", "partition": lab.partition,
        "venv": str(lab.venv), "job_name": job_dir.name, "job_dir": str(job_dir), "cache_dir": lab_cache_dir(),
    }
    base.update(flags)
    spec, _ = build_spec(base, profile=str(PROFILE))
    return spec


def submit(spec: Any) -> tuple[Any, str]:
    from slurm_vllm.render import prepare_job

    jd = prepare_job(spec)
    return jd, sbatch(jd.script)


def wait_final_or_ready(jd: Any, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        s = read_state(jd)
        return s if s.get("phase") in ("READY", "ENDED", "FAILED") else None

    return wait_for(check, timeout, f"READY/ENDED/FAILED in {jd.state}", poll=1.0)


def require_ready(jd: Any) -> dict[str, Any]:
    state = wait_final_or_ready(jd)
    assert state["phase"] == "READY", f"{state.get('phase')}: {state.get('reason')}\n{state.get('log_tail')}"
    times = state.get("phase_times", {})
    start = min(times.values()) if times else 0.0
    print(f"\n{jd.path.name}: " + ", ".join(f"{k} at {v - start:.1f}s" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
          + f"; vLLM loaded in {state.get('load_seconds')}s")
    return state


def end_job(job_id: str) -> None:
    scancel(job_id)
    wait_gone(job_id, 120)


def chat(endpoint: dict[str, Any], key: str | None, max_tokens: int = 12) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=endpoint["base_url"], api_key=key or "no-key", max_retries=0, timeout=120)
    return client.chat.completions.create(
        model=endpoint["model"], messages=PROMPT, temperature=0, max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
    )


@pytest.fixture(scope="module", autouse=True)
def tiny_model(lab: Lab) -> None:
    if not (lab.model / "config.json").exists():
        pytest.skip(f"no tiny model at {lab.model}; run scripts/lab/setup-venv")


@pytest.fixture(scope="module")
def ray_job(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 2-node job, PP=2 over Ray, READY; shared by the answer test and the scancel test.

    Its nodes have an HTTP proxy that goes nowhere, as compute nodes set one for downloads: the
    readiness probe (which sends the key) must not follow it, or READY never comes.
    """
    job_dir = tmp_path_factory.mktemp("serving") / "ray-pp2"
    jd, job_id = submit(lab_spec(lab, job_dir, pipeline_parallel_size=2, tensor_parallel_size=1, env=DEAD_PROXY))
    t0 = time.monotonic()
    try:
        state = require_ready(jd)
        yield {"jd": jd, "job_id": job_id, "state": state, "ready_s": time.monotonic() - t0}
    finally:
        end_job(job_id)


def test_ray_pp2_two_nodes_ready_answers_with_key_and_401_without(ray_job: dict[str, Any]) -> None:
    import openai

    jd, job_id = ray_job["jd"], ray_job["job_id"]
    endpoint = json.loads(jd.endpoint.read_text())
    assert stat.S_IMODE(jd.endpoint.stat().st_mode) == 0o600
    assert endpoint["job_id"] == job_id and endpoint["base_url"].endswith("/v1")
    assert "127.0.0.1" not in endpoint["base_url"]  # the head's own address, reachable from other nodes
    key = jd.read_secret(jd.api_key)
    assert key

    reply = chat(endpoint, key)
    assert reply.usage.completion_tokens == 12
    assert reply.choices[0].message.content
    ANSWERS["ray-pp2"] = reply.choices[0].message.content

    with pytest.raises(openai.AuthenticationError) as err:
        chat(endpoint, None)
    assert err.value.status_code == 401

    # The pipeline really spans both nodes: the second stage ran on a raylet with another IP.
    log = jd.vllm_log().read_text(errors="replace")
    head_ip = endpoint["base_url"].split("//", 1)[1].rsplit(":", 1)[0]
    remote = [line for line in log.splitlines() if "Worker_PP1" in line and "ip=" in line]
    assert remote and all(f"ip={head_ip}" not in line for line in remote), "PP stage 1 was not on the other node"

    # The key is nowhere in the script, the logs, or any process's command line.
    assert key not in jd.script.read_text()
    for f in jd.logs.iterdir():
        assert key not in f.read_text(errors="replace"), f"the API key leaked into {f.name}"
    assert all(key not in p.cmdline for p in job_processes(job_id, width=100_000))


def test_the_timeline_has_every_phase_in_order_with_plausible_durations(ray_job: dict[str, Any]) -> None:
    from slurm_vllm import timeline
    from slurm_vllm.jobdir import StateRecord

    state = StateRecord.model_validate(json.loads(ray_job["jd"].state.read_text()))
    moments = timeline.build(state)
    names = list(dict.fromkeys(m.name for m in moments))  # in order, each once (joined 1/2, 2/2 ...)
    needed = [timeline.STARTED, timeline.ALLOCATED, timeline.RAY_HEAD, timeline.JOINED,
              timeline.VLLM_STARTED, timeline.ENGINE_READY, timeline.FIRST_COMPLETION, "READY"]
    assert [n for n in names if n in needed] == [n for n in needed if n in names] and set(needed) <= set(names), names
    # The pre-flight's verdict is reached while Ray forms, and always before vLLM starts.
    assert names.index(timeline.ALLOCATED) < names.index(timeline.PREFLIGHT) < names.index(timeline.VLLM_STARTED)
    assert [m.at for m in moments] == sorted(m.at for m in moments), "the moments are not in time order"
    assert [m.detail for m in moments if m.name == timeline.JOINED][-1] == "2/2"
    spans = timeline.durations(moments)
    assert {"setup", "ray", "loading", "first_completion", "total"} <= set(spans), spans
    assert 0 < spans["ray"] < 120 and 5 < spans["loading"] < READY_TIMEOUT and spans["first_completion"] < 60
    assert spans["total"] <= ray_job["ready_s"] + 60  # the node side's clock agrees with the test's


def test_time_limit_warning_lets_the_inflight_completion_finish_then_ends(ray_job: dict[str, Any]) -> None:
    """Slurm's warning (what `#SBATCH --signal=USR2@grace` sends) while a long completion streams:
    vLLM stops taking requests, drains the one in flight, and the job ends ENDED "time limit"
    with nothing left behind. (scancel of a READY job is the CLI test's `cancel`.)"""
    from openai import OpenAI

    jd, job_id = ray_job["jd"], ray_job["job_id"]
    assert read_state(jd)["phase"] == "READY"
    endpoint = json.loads(jd.endpoint.read_text())
    client = OpenAI(base_url=endpoint["base_url"], api_key=jd.read_secret(jd.api_key), max_retries=0, timeout=300)
    stream = client.chat.completions.create(
        model=endpoint["model"], messages=PROMPT, temperature=0, max_tokens=LONG_COMPLETION, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)  # the completion is in flight now
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    usage = None
    for chunk in [first, *chunks]:
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == LONG_COMPLETION, usage
    wait_gone(job_id, 180)
    state = read_state(jd)
    assert state["phase"] == "ENDED" and state["reason"] == "time limit", state
    vllm_log = jd.vllm_log().read_text(errors="replace")
    assert "[shutdown] API server: shutdown triggered" in vllm_log, vllm_log[-2000:]  # vLLM's own, orderly
    head_log = (jd.logs / "node-0.log").read_text()
    assert "time-limit warning: draining in-flight requests" in head_log and "in-flight requests finished" in head_log
    assert "staying in the cluster" in (jd.logs / "node-1.log").read_text()
    assert_no_processes(job_id)


def _serve_and_answer(lab: Lab, job_dir: Path, **flags: Any) -> tuple[str, dict[str, Any]]:
    jd, job_id = submit(lab_spec(lab, job_dir, **flags))
    try:
        state = require_ready(jd)
        endpoint = json.loads(jd.endpoint.read_text())
        reply = chat(endpoint, jd.read_secret(jd.api_key))
        assert reply.usage.completion_tokens == 12
        return reply.choices[0].message.content, state
    finally:
        end_job(job_id)
        assert_no_processes(job_id)


def test_two_one_node_replicas_and_the_mp_backend_answer_alike(lab: Lab, tmp_path: Path) -> None:
    """``--replicas 2`` over 2 nodes: two one-node vLLM servers (no Ray) behind the router and
    its front, READY 2/2, requests reaching both, each reading its weights from its own node's
    /dev/shm (stage_weights: shm), removed after. Then, on a lab of fewer than 4 nodes, the
    2-node mp backend (PP=2; with 4, the next test's replicas of two nodes run it): at
    temperature 0 all give the same answer (and Ray's PP=2, when the module ran it)."""
    import slurm_vllm

    rdir = tmp_path / "replicas"
    jd, job_id = submit(lab_spec(lab, rdir, replicas=2, router_policy="round_robin", stage_weights="shm"))
    try:
        job = slurm_vllm.attach(job_id)
        job.wait_ready(timeout=READY_TIMEOUT)
        st = job.status()
        assert st.summary().startswith("READY 2/2 replicas http://"), st.summary()
        endpoint = json.loads(jd.endpoint.read_text())
        assert endpoint["base_url"] == st.url and st.url not in {r["url"] for r in st.replicas}  # the front's
        before = {r.index: r.requests_finished or 0 for r in job.metrics(interval=0).replicas}
        answers = {chat(endpoint, jd.read_secret(jd.api_key)).choices[0].message.content for _ in range(4)}
        grown = {r.index: (r.requests_finished or 0) - before[r.index] for r in job.metrics(interval=0).replicas}
        assert sorted(grown) == [0, 1] and all(n > 0 for n in grown.values()), f"requests per replica: {grown}"
        assert len(answers) == 1, f"temperature 0, two replicas of one model: {answers}"
        single = answers.pop()
    finally:
        end_job(job_id)
        assert_no_processes(job_id)
    for rank in (0, 1):
        node_log = jd.node_log(rank).read_text()
        staged = re.search(r"staged \S+ \S+ in [\d.]+ s \(\d+ MB/s\) at (/dev/shm/\S+)", node_log)
        assert staged, node_log[-2000:]
        assert f"serve {staged.group(1)} " in jd.vllm_log(rank=rank).read_text()  # vLLM loaded the node's copy ...
        assert f"removed the staged weights {staged.group(1)}" in node_log  # ... which is gone after the job
    assert single, "the replicas' answer is empty"
    ANSWERS["one-node"] = single
    if "ray-pp2" in ANSWERS:
        assert ANSWERS["ray-pp2"] == single, "temperature 0: the Ray PP=2 answer differs from the one-node one"
    if len(lab.nodes) >= 4:
        return
    two, state = _serve_and_answer(lab, tmp_path / "mp-pp2", nodes=2, backend="mp",
                                   pipeline_parallel_size=2, tensor_parallel_size=1)
    assert state["phase"] == "READY"
    assert two == single, "temperature 0: the 2-node mp answer differs from the replicas' one-node one"


def test_two_replicas_of_two_nodes_each_serve_and_restart_whole(lab: Lab, tmp_path: Path) -> None:
    """``--nodes 4 --replicas 2`` with PP=2: each replica is vLLM's mp mode over two nodes (the
    first serving its API, the second headless). READY 2/2, requests reach both, the answer is
    the one-node one; the headless part of replica 1 killed: DEGRADED 1/2, the whole replica
    restarted, READY 2/2 again; the end leaves nothing."""
    if len(lab.nodes) < 4:
        pytest.skip(f"the lab has {len(lab.nodes)} nodes; 2 replicas of 2 nodes need 4")
    import slurm_vllm

    jd, job_id = submit(lab_spec(lab, tmp_path / "replicas-2x2", nodes=4, replicas=2, router_policy="round_robin",
                                 pipeline_parallel_size=2, tensor_parallel_size=1))
    try:
        job = slurm_vllm.attach(job_id)
        job.wait_ready(timeout=READY_TIMEOUT)
        st = job.status()
        assert st.summary().startswith("READY 2/2 replicas http://"), st.summary()
        assert [len(r["nodes"]) for r in st.replicas] == [2, 2] and st.replicas[1]["nodes"] == list(lab.nodes[2:4])
        for rank, role in ((1, r"--node-rank 1 .*--headless"), (2, r"--node-rank 0 "), (3, r"--node-rank 1 .*--headless")):
            started = jd.vllm_log(rank=rank).read_text().splitlines()[0]
            assert re.search(r"--nnodes 2 " + role, started), f"rank {rank}: {started}"
        endpoint = json.loads(jd.endpoint.read_text())
        before = {r.index: r.requests_finished or 0 for r in job.metrics(interval=0).replicas}
        answers = {chat(endpoint, jd.read_secret(jd.api_key)).choices[0].message.content for _ in range(4)}
        grown = {r.index: (r.requests_finished or 0) - before[r.index] for r in job.metrics(interval=0).replicas}
        assert sorted(grown) == [0, 1] and all(n > 0 for n in grown.values()), f"requests per replica: {grown}"
        assert len(answers) == 1, f"temperature 0, two replicas of one model: {answers}"
        if "one-node" in ANSWERS:
            assert answers == {ANSWERS["one-node"]}, "temperature 0: PP=2 over two nodes differs from one node"
        host = st.replicas[1]["nodes"][1]
        headless = serve_pids(job_id, host)  # that node runs nothing else of vLLM
        assert headless, f"no headless vllm serve of job {job_id} on {host}"
        seen = kill_then_back(job, headless[0], READY_TIMEOUT)
        assert any(x.startswith("DEGRADED 1/2") for x in seen), seen
        final = job.status()
        assert [r["restarts"] for r in final.replicas] == [0, 1], final.replicas
        assert "replica 1: restart 1/" in jd.node_log(2).read_text()  # by the replica's first node
        part = jd.read_headless(3)
        assert part is not None and (part.phase, part.attempt) == ("running", 1), part  # the new launch's
        assert chat(endpoint, jd.read_secret(jd.api_key)).choices[0].message.content == answers.pop()
    finally:
        end_job(job_id)
        assert_no_processes(job_id)


def test_lab_shim_is_inert_unless_enabled(lab: Lab) -> None:
    """The lab venv's CPU Ray shim changes vLLM only when SLURM_VLLM_LAB_CPU_RAY=1."""

    python = str(lab.python)
    code = ("from vllm.platforms.cpu import CpuPlatform; "
            "from vllm.distributed.device_communicators import cpu_communicator as c; "
            "print(repr(CpuPlatform.ray_device_key), c.CpuCommunicator._all_group_ranks_share_shm_group_name.__name__)")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_VLLM_LAB_CPU_RAY")}
    off = subprocess.run([python, "-c", code], env=base, capture_output=True, text=True, timeout=120)
    on = subprocess.run([python, "-c", code], env={**base, "SLURM_VLLM_LAB_CPU_RAY": "1"},
                        capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and on.returncode == 0, off.stderr + on.stderr
    assert off.stdout.split() == ["''", "_all_group_ranks_share_shm_group_name"]
    assert on.stdout.split() == ["'vllm_cpu'", "all_ranks_share_shm"]


def test_a_stage_target_too_small_fails_before_vllm_with_the_reason(lab: Lab, tmp_path: Path) -> None:
    jd, job_id = submit(lab_spec(lab, tmp_path / "too-small", nodes=1, stage_weights="shm",
                                 env={"SLURM_VLLM_STAGE_RESERVE": "100000G"}))
    try:
        state = wait_final_or_ready(jd, timeout=180)
        assert state["phase"] == "FAILED" and "/dev/shm" in state["reason"] and "free" in state["reason"], state
        assert not (jd.path / "logs" / "vllm.log").exists(), "vLLM was started"
    finally:
        end_job(job_id)
        assert_no_processes(job_id)


def test_every_node_passed_the_preflight_with_a_real_cross_node_all_reduce(ray_job: dict[str, Any]) -> None:
    checks = json.loads(ray_job["jd"].state.read_text())["preflight"]
    by_node: dict[str, set[str]] = {}
    for c in checks:
        assert c["status"] != "fail", c
        by_node.setdefault(c["node"], set()).add(c["check"])
    assert len(by_node) == 2, checks
    for node, seen in by_node.items():
        assert {"address", "ports", "shm", "temp_dir", "gpus", "model"} <= seen, (node, seen)
    reduce = [c for c in checks if c["check"] == "allreduce"]
    assert reduce and all(c["status"] == "ok" for c in reduce), reduce


def test_a_model_missing_on_some_nodes_fails_the_preflight_naming_them(lab: Lab, tmp_path: Path) -> None:
    """The model is on the login side and on the first node only (each lab node has its own
    /tmp/ray): the pre-flight names the other nodes before Ray or vLLM start."""

    if len(lab.nodes) < 3:
        pytest.skip("needs 3 lab nodes or more")
    name = f"svl-model-{os.getpid()}"
    here = Path("/tmp/ray") / name
    on_first = Path(lab.get("LAB_HOME")) / "nodes" / lab.nodes[0] / "tmp-ray" / name
    for copy in (here, on_first):
        shutil.copytree(lab.model, copy)
    try:
        jd, job_id = submit(lab_spec(lab, tmp_path / "missing", model=str(here), nodes=len(lab.nodes)))  # every node
        try:
            state = wait_final_or_ready(jd, timeout=180)
            assert state["phase"] == "FAILED", state
            assert state["reason"].startswith("preflight: ") and "does not exist on this node" in state["reason"]
            assert all(node in state["reason"] for node in lab.nodes[1:]) and lab.nodes[0] not in state["reason"]
            assert not (jd.path / "logs" / "vllm.log").exists(), "vLLM was started"
        finally:
            end_job(job_id)
            assert_no_processes(job_id)
    finally:
        for copy in (here, on_first):
            shutil.rmtree(copy, ignore_errors=True)


def test_broken_model_fails_with_vllms_error_and_no_orphans(lab: Lab, tmp_path: Path) -> None:
    model = tmp_path / "broken-model"
    shutil.copytree(lab.model, model)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] += 2  # the checkpoint lacks these layers' weights
    (model / "config.json").write_text(json.dumps(config))
    jd, job_id = submit(lab_spec(lab, tmp_path / "broken", model=str(model)))
    try:
        state = wait_final_or_ready(jd)
        assert state["phase"] == "FAILED", state
        assert "vllm exited with code" in state["reason"]
        assert "weights were not initialized from checkpoint" in state["reason"]  # vLLM's own words
        assert state["log_tail"]
        assert not jd.endpoint.exists()
        wait_gone(job_id, 120)
    finally:
        scancel(job_id)
    assert_no_processes(job_id)
    sacct = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True,
                           text=True, timeout=30, check=False).stdout
    assert "COMPLETED" not in sacct, f"a failed job must not end COMPLETED in Slurm: {sacct!r}"
