"""Replicas on the lab: three real vLLM servers (one per node) behind real vllm-router and the
authenticating front, one URL. One job serves the whole module, in order: READY 3/3, requests
reach every replica, strangers are refused, a killed replica comes back while the others serve,
cancel leaves nothing.

Run alone with ``pytest -m vllm tests/lab/test_replicas.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
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
    scancel,
    serve_pids,
    wait_for,
    wait_gone,
)
from tests.lab.test_serving import lab_spec, submit

pytestmark = [pytest.mark.lab, pytest.mark.vllm]

REPLICAS = 3
READY_TIMEOUT = 600  # three vLLM servers start at once on the lab's two cores


@pytest.fixture(scope="module")
def served(lab: Lab) -> Iterator[tuple[Any, str]]:
    """One job with three one-node replicas (round robin, so every replica gets requests)."""
    if len(lab.nodes) < REPLICAS:
        pytest.skip(f"the lab has {len(lab.nodes)} nodes; {REPLICAS} replicas need {REPLICAS}")
    import slurm_vllm

    # Outside pytest's tmp_path (see the workdir fixture): a new directory the job will own.
    root = Path(tempfile.mkdtemp(prefix="svl-replicas-", dir=os.environ.get("SLURM_VLLM_LAB_TMP", "/tmp")))
    root.chmod(0o755)
    job_dir = root / "job"
    spec = lab_spec(lab, job_dir, nodes=REPLICAS, replicas=REPLICAS, router_policy="round_robin",
                    extra_args=["--max-model-len", "256", "--dtype", "float32", "--enforce-eager"])
    jd, job_id = submit(spec)
    job = slurm_vllm.attach(job_id)
    try:
        yield job, job_id
    finally:
        scancel(job_id)
        wait_gone(job_id, 120)
        shutil.rmtree(root, ignore_errors=True)


def _ready(job: Any) -> Any:
    job.wait_ready(timeout=READY_TIMEOUT)
    return job.status()


def test_all_replicas_ready_behind_one_url(served: tuple[Any, str]) -> None:
    job, _ = served
    st = _ready(job)
    assert st.summary().startswith(f"READY {REPLICAS}/{REPLICAS} replicas http://"), st.summary()
    assert [r["phase"] for r in st.replicas] == ["ready"] * REPLICAS
    assert len({r["url"] for r in st.replicas} | {st.url}) == REPLICAS + 1  # own URLs, and the front's


def test_requests_reach_every_replica(served: tuple[Any, str]) -> None:
    job, _ = served
    _ready(job)
    before = {r.index: r.requests_finished or 0 for r in job.metrics(interval=0).replicas}
    client = job.openai_client(max_retries=0, timeout=60)
    for i in range(30):
        out = client.chat.completions.create(model=job.endpoint.model, max_tokens=4,
                                             messages=[{"role": "user", "content": f"Count to {i}."}])
        assert out.choices[0].message.content is not None
    after = job.metrics(interval=0)
    grown = {r.index: (r.requests_finished or 0) - before[r.index] for r in after.replicas}
    assert all(n > 0 for n in grown.values()), f"requests per replica: {grown}"
    assert sum(grown.values()) >= 30
    assert after.router_answering and sum(r.requests_routed or 0 for r in after.replicas) >= 30


def test_strangers_on_another_node_are_refused(served: tuple[Any, str]) -> None:
    """From a node of the job that is not the front's, as any user of the cluster network."""
    job, job_id = served
    st = _ready(job)
    key = job.endpoint.api_key
    front = st.url.rsplit("/v1", 1)[0]
    router = job.jobdir.read_state().router_address  # 127.0.0.1:PORT on the front's node
    router_port = router.rsplit(":", 1)[1]
    script = "\n".join([
        'code() { curl -s -m 5 -o /dev/null -w "%{http_code}" "$@" || true; }',
        f'echo "nokey $(code {front}/v1/models)"',
        f'echo "wrong $(code -H "Authorization: Bearer wrong-{key[:4]}" {front}/v1/models)"',
        f'echo "right $(code -H "Authorization: Bearer $KEY" {front}/v1/models)"',
        *(f'echo "admin{p} $(code -X POST -H "Authorization: Bearer $KEY" "{front}{p}")"'
          for p in ("/list_workers", "/add_worker?url=http://10.0.0.1:1", "/remove_worker?url=x", "/flush_cache",
                    "/get_loads", "/workers/x")),
        f'echo "router $(code http://{front.split("//")[1].split(":")[0]}:{router_port}/list_workers)"',
    ])
    other = st.replicas[1]["nodes"][0]
    out = subprocess.run(["srun", f"--jobid={job_id}", "--overlap", "-N1", "-n1", "-w", other, "bash", "-c", script],
                         env={**os.environ, "KEY": key}, capture_output=True, text=True, timeout=90, check=True).stdout
    seen = dict(line.split(" ", 1) for line in out.split("\n") if line)
    assert (seen["nokey"], seen["wrong"], seen["right"]) == ("401", "401", "200"), out
    assert all(v == "404" for k, v in seen.items() if k.startswith("admin")), out
    assert seen["router"] == "000", f"the router answered from {other}: {out}"  # loopback only


def test_a_worker_registered_through_the_routers_loopback_port_is_taken_out(served: tuple[Any, str]) -> None:
    """A neighbour on the router's node registers a worker of its own (here: replica 0 again,
    under its host name): rank 0 takes it out within a poll and names it in its log."""
    import json

    job, job_id = served
    st = _ready(job)
    router = job.jobdir.read_state().router_address
    host, port = st.replicas[0]["nodes"][0], st.replicas[0]["url"].rsplit(":", 1)[1].split("/")[0]
    intruder = f"http://{host}:{port}"
    script = (f'curl -s -m 60 -o /dev/null -w "added %{{http_code}}\n" -X POST "http://{router}/add_worker?url={intruder}"; '
              f'sleep 4; curl -s -m 5 "http://{router}/list_workers"')
    out = subprocess.run(["srun", f"--jobid={job_id}", "--overlap", "-N1", "-n1", "-w", host, "bash", "-c", script],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    added, listed = out.split("\n", 1)
    assert added == "added 200", out  # the router takes it: it checks no key
    assert intruder not in json.loads(listed)["urls"], out
    log = job.jobdir.node_log(0).read_text()
    assert f"took {intruder} out of the router: the job never added it" in log


def test_killed_replica_restarts_while_the_others_serve(served: tuple[Any, str], lab: Lab) -> None:
    job, job_id = served
    st = _ready(job)
    victim = st.replicas[-1]
    host = victim["nodes"][0]
    vllm = serve_pids(job_id, host)
    assert vllm, f"no vllm serve process of job {job_id} on {host}"
    client = job.openai_client(max_retries=0, timeout=60)
    model = job.endpoint.model
    results: list[bool] = []
    errors: list[str] = []
    done = threading.Event()

    def requests_meanwhile() -> None:
        while not done.is_set():
            try:
                client.completions.create(model=model, prompt="hi", max_tokens=2)
                results.append(True)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                results.append(False)
                errors.append(repr(exc)[:200])
            done.wait(1.0)  # a steady trickle: the restart shares the two cores with it

    loop = threading.Thread(target=requests_meanwhile, daemon=True)
    loop.start()
    try:
        seen = kill_then_back(job, vllm[0], READY_TIMEOUT)
    finally:
        done.set()
        loop.join(90)
    assert any(s.startswith(f"DEGRADED {REPLICAS - 1}/{REPLICAS}") for s in seen), seen
    final = job.status()
    assert final.summary().startswith(f"READY {REPLICAS}/{REPLICAS}"), final.summary()
    assert [r["restarts"] for r in final.replicas] == [0] * (REPLICAS - 1) + [1]
    lost = results.count(False)
    assert len(results) >= 20 and lost <= len(results) // 100, f"{lost}/{len(results)} lost: {errors[:3]}"


def test_cancel_stops_router_and_every_replica(served: tuple[Any, str]) -> None:
    job, job_id = served
    _ready(job)
    assert any("router" in p.cmdline for p in job_processes(job_id))  # its process title: vllm::router
    t0 = time.monotonic()
    scancel(job_id)
    wait_for(lambda: job.status().final, 120, "the job to end", poll=1.0)
    assert job.status().phase.value == "ENDED", job.status().summary()
    wait_gone(job_id, 120)
    assert_no_processes(job_id)
    assert time.monotonic() - t0 < 120
