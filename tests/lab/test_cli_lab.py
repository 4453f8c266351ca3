"""The CLI, the Python API and the submitit path against the real Slurm lab (and real vLLM).

Nothing here fakes Slurm: jobs are really submitted, followed, cancelled. Tests marked ``vllm``
also serve the lab's tiny model with CPU vLLM and talk to it through the OpenAI client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from slurm_vllm.jobdir import plain
from tests.lab.lab import (
    LAB_NODES,
    Lab,
    assert_no_processes,
    cli,
    fake_python,
    lab_cache_dir,
    lab_serve_flags,
    lab_serve_kwargs,
    scancel,
    squeue_me,
    wait_gone,
)

pytestmark = pytest.mark.lab

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _job_id(out: str) -> str:
    first = out.splitlines()[0]
    assert first.startswith("Submitted job "), out
    return first.split()[-1]


# --------------------------------------------------------------------------------------------
# Slurm's refusals and failures
# --------------------------------------------------------------------------------------------


def test_bad_partition_exit_3_with_slurms_message_and_nothing_queued(home: Path) -> None:
    proc = cli(["submit", "org/model", "--partition", "no-such-partition"], home)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: sbatch exited 1: sbatch: error:"), err
    assert "invalid partition specified: no-such-partition" in err  # Slurm's own words
    # nothing of ours is queued: no job runs from a directory under this test's jobs root
    assert not [j for j in squeue_me() if j[2].startswith(str(home))]
    assert list((home / "jobs").iterdir()) == []  # a refused submission leaves nothing behind


def test_node_program_failure_exit_4_with_reason_and_log(lab: Lab, home: Path, tmp_path: Path) -> None:
    py = fake_python(tmp_path, 'echo "simulated node failure: cannot import vllm" >&2\nexit 1')
    proc = cli(["submit", "org/model", "--partition", lab.partition, "--nodes", "2", "--gpus-per-node", "1",
                "--python", py, "--time", "00:05:00", "--wait", "--timeout", "120"], home, timeout=180)
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    jid = _job_id(proc.stdout)
    assert f"job {jid} FAILED" in proc.stderr
    assert "FAILED" in proc.stderr and "exit code" in proc.stderr
    assert "simulated node failure: cannot import vllm" in proc.stderr  # the failing node's log tail
    st = cli(["status", jid, "--json"], home)
    data = json.loads(st.stdout)
    assert st.returncode == 0 and data["phase"] == "FAILED" and data["job_id"] == jid


def test_hand_submitted_rendered_script_is_followed(lab: Lab, home: Path, tmp_path: Path) -> None:
    py = fake_python(tmp_path, "sleep 300")
    script = tmp_path / "serve.sbatch"
    r = cli(["render", "org/model", "--partition", lab.partition, "--nodes", "2", "--gpus-per-node", "1",
             "--python", py, "--time", "00:05:00", "-o", str(script)], home)
    assert r.returncode == 0, r.stderr
    # submitted by hand, exactly as a user would
    sb = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, timeout=60, check=True)
    jid = sb.stdout.split()[-1]
    try:
        deadline = time.monotonic() + 60
        while True:
            st = cli(["status", jid, "--json"], home)
            assert st.returncode == 0, st.stderr
            data = json.loads(st.stdout)
            if data["phase"] == "STARTING_RAY" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert data["phase"] == "STARTING_RAY" and data["nodes_expected"] == 2, data
        assert data["job_id"] == jid and Path(data["job_dir"]).parent == home / "jobs"

        lst = cli(["list", "--json"], home)
        assert jid in [row["job_id"] for row in json.loads(lst.stdout)]

        w = cli(["wait", jid, "--timeout", "3"], home)
        assert w.returncode == 5, w.stderr
        assert "not ready after 3 s" in w.stderr

        c = cli(["cancel", jid], home)
        assert c.returncode == 0, c.stderr
        assert "ENDED" in c.stdout and "cancelled" in c.stdout
        assert all(j[0] != jid or j[1] == "CANCELLED" for j in squeue_me())
        after = json.loads(cli(["status", jid, "--json"], home).stdout)
        assert after["phase"] == "ENDED" and "cancelled" in after["reason"]
    finally:
        scancel(jid)


def test_api_submit_status_cancel_with_a_stand_in_node_program(lab: Lab, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(home))
    import slurm_vllm

    py = fake_python(tmp_path, "sleep 300")
    spec = slurm_vllm.ServeSpec("org/model", nodes=1, gpus_per_node=1, partition=lab.partition, python=py, time="00:05:00")
    with slurm_vllm.submit(spec) as job:
        assert job.job_id and (job.job_dir / "job_id").read_text().strip() == job.job_id
        again = slurm_vllm.attach(job.job_id)
        assert again.job_dir == job.job_dir
        assert job.status().phase in ("PENDING", "STARTING_RAY")
        assert "<table>" in job._repr_html_()
    wait_gone(job.job_id)
    assert job.status(force=True).phase == "ENDED"


def test_submitit_path_uses_the_same_job_dir_and_handle(lab: Lab, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit")
    monkeypatch.setenv("SLURM_VLLM_HOME", str(home))
    import slurm_vllm

    spec = slurm_vllm.ServeSpec("org/model", nodes=2, gpus_per_node=1, partition=lab.partition, time="00:05:00")
    job = slurm_vllm.submit(spec, via="submitit")
    try:
        script = (job.job_dir / "job.sbatch").read_text()
        assert "submitit" in script and "--nodes=2" in script and "--comment=slurm_vllm" in script
        assert f"--chdir={job.job_dir}" in script or f"--chdir='{job.job_dir}'" in script
        # found from its id alone (WorkDir), and listed as one of ours (comment)
        assert slurm_vllm.attach(job.job_id).job_dir == job.job_dir
        lst = json.loads(cli(["list", "--json"], home).stdout)
        assert job.job_id in [r["job_id"] for r in lst]
        # each node's output lands in logs/node-<rank>.log, as with the sbatch path
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (job.job_dir / "logs" / "node-1.log").exists():
            time.sleep(1)
        assert (job.job_dir / "logs" / "node-0.log").exists() and (job.job_dir / "logs" / "node-1.log").exists()
    finally:
        st = job.cancel()
    assert st.final


# --------------------------------------------------------------------------------------------
# End to end with real vLLM (slow; one server at a time)
# --------------------------------------------------------------------------------------------


def _chat(base_url: str, api_key: str, model: str) -> str:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    return reply.choices[0].message.content or ""


@pytest.mark.vllm
def test_cli_submit_wait_endpoint_chat_cancel(lab: Lab, home: Path) -> None:
    proc = cli(["submit", *lab_serve_flags(lab), "--wait", "--timeout", "900"], home, timeout=960)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    jid = _job_id(proc.stdout)
    assert "READY http://" in proc.stdout
    ep = json.loads(cli(["endpoint", jid, "--json"], home).stdout)
    assert ep["base_url"].startswith("http://") and ep["api_key"]
    env = cli(["endpoint", jid, "--env"], home).stdout
    assert "export OPENAI_BASE_URL=" in env and "export OPENAI_API_KEY=" in env
    text = _chat(ep["base_url"], ep["api_key"], ep["model"])
    assert isinstance(text, str)
    wrong = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", ep["base_url"] + "/models",
                            "-H", "Authorization: Bearer wrong"], capture_output=True, text=True, timeout=30, check=False)
    assert wrong.stdout == "401"

    # Requeue the READY job (as a node failure or preemption would): `wait` follows it through
    # PENDING (requeued) back to READY with the second run's endpoint; the first run's logs and
    # records are kept beside each other.
    jd = Path(ep_dir(home, jid))
    first_endpoint = json.loads((jd / "endpoint.json").read_text())
    assert first_endpoint["restart"] == 0
    subprocess.run(["scontrol", "requeue", jid], check=True, capture_output=True, timeout=30)
    st = _wait_status(home, jid, lambda s: s["phase"] == "PENDING", 120)
    assert st["reason"].startswith("requeued"), st
    early = cli(["endpoint", jid], home)
    assert early.returncode != 0 and early.stdout == ""  # the first run's URL is not handed out
    # Slurm holds a requeued job back for about two minutes (BeginTime); wait follows it through.
    again = cli(["wait", jid, "--timeout", "900", "--json"], home, timeout=960)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["restart"] == 1
    second_endpoint = json.loads((jd / "endpoint.json").read_text())
    assert second_endpoint["restart"] == 1
    assert json.loads((jd / "logs" / "state.json").read_text())["restart"] == 0
    assert "ray head" in (jd / "logs" / "node-0.log").read_text()  # the first run's log, kept
    assert "ray head" in (jd / "logs" / "attempt-1" / "node-0.log").read_text()
    # The second run of the same model finds the first run's compile caches in the cache_dir
    # (vLLM names the entry it loads; this CPU build then recompiles its AOT graph, warm from
    # inductor's entries: docs/performance.md).
    cache = Path(lab_cache_dir())
    assert list(cache.glob("vllm-*/vllm/torch_compile_cache/*")), f"nothing cached under {cache}"
    second_log = plain((jd / "logs" / "attempt-1" / "vllm.log").read_text(errors="replace"))
    assert re.search(rf"[Ll]oad[^\n]* {re.escape(str(cache))}/vllm-[^/\s]+/vllm/torch_compile_cache", second_log), \
        "the second run did not load from the first run's compile cache"
    ep = json.loads(cli(["endpoint", jid, "--json"], home).stdout)
    assert isinstance(_chat(ep["base_url"], ep["api_key"], ep["model"]), str)

    c = cli(["cancel", jid], home, timeout=180)
    assert c.returncode == 0 and "ENDED" in c.stdout, c.stderr
    st = json.loads(cli(["status", jid, "--json"], home).stdout)
    assert st["phase"] == "ENDED" and "cancelled" in st["reason"], st
    assert_no_processes(jid)
    dead = cli(["endpoint", jid, "--json"], home)
    assert dead.returncode == 4 and dead.stdout == "" and ep["api_key"] not in dead.stderr

    # The ended job is listed with --all only, and cleanup removes its directory.
    assert jid not in cli(["list"], home).stdout
    listed = {r["job_id"]: r for r in json.loads(cli(["list", "--all", "--json"], home).stdout)}
    assert listed[jid]["phase"] == "ENDED", listed
    clean = cli(["cleanup"], home)
    assert clean.returncode == 0 and str(jd) in clean.stdout and not jd.exists()


def ep_dir(home: Path, jid: str) -> str:
    """The job directory of ``jid`` under this test's jobs root."""
    for d in (home / "jobs").iterdir():
        if (d / "job_id").exists() and (d / "job_id").read_text().strip() == jid:
            return str(d)
    raise AssertionError(f"no job directory of {jid} under {home}")


def _wait_status(home: Path, jid: str, ok: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = json.loads(cli(["status", jid, "--json"], home).stdout)
        if ok(st):
            return st
        time.sleep(1)
    raise AssertionError(f"job {jid}: condition not reached in {timeout:g} s; last status {st}")


def test_submitit_runs_the_real_node_program_to_a_formed_cluster_and_cancel(lab: Lab, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The submitit path with the real node program: Ray forms over both nodes under submitit's
    own srun, and a cancel ends it with its reason and nothing left. (Serving after that is the
    same code as on the sbatch path, which the vLLM tests below cover.)"""
    pytest.importorskip("submitit")
    monkeypatch.setenv("SLURM_VLLM_HOME", str(home))
    import slurm_vllm

    kw = lab_serve_kwargs(lab)
    kw["env"] = {**dict(kw.get("env") or {}), "SLURM_VLLM_NODE_NO_SERVE": "1"}  # hold the formed cluster
    job = slurm_vllm.submit(slurm_vllm.ServeSpec(**kw), via="submitit")  # type: ignore[arg-type]
    try:
        st = _wait_status(home, job.job_id, lambda s: s["phase"] == "LOADING_MODEL" or s["phase"] in ("ENDED", "FAILED"), 300)
        assert st["phase"] == "LOADING_MODEL" and st["nodes_joined"] == st["nodes_expected"] == LAB_NODES, st
    finally:
        st = job.cancel(timeout=180)
    assert st.phase == "ENDED" and "cancelled" in (st.reason or ""), (st.phase, st.reason, st.slurm_state)
    assert_no_processes(job.job_id)


@pytest.mark.vllm
def test_notebook_runs_headless(lab: Lab, home: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(DOCS / "notebook.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook has one cell tagged 'parameters'"
    kw = lab_serve_kwargs(lab)
    model = kw.pop("model")
    params[0].source = (
        "import os\n"
        f"os.environ['SLURM_VLLM_HOME'] = {str(home)!r}\n"
        f"MODEL = {model!r}\n"
        f"OPTIONS = {kw!r}\n"
        "TIMEOUT = 900\n"
    )
    client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(home.parent)}})
    client.execute()
    outputs = "\n".join(
        o.get("text", "") or json.dumps(o.get("data", {})) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    # The same path as the Python API: submit, wait_ready (progress lines), openai_client, cancel.
    assert "READY" in outputs and "ENDED" in outputs, outputs[-2000:]
    assert "STARTING_RAY" in outputs or "LOADING_MODEL" in outputs, outputs[-2000:]  # wait_ready's progress
    assert os.environ.get("SLURM_VLLM_HOME") != str(home)  # the kernel's env did not leak here


def _doctor(lab: Lab, home: Path, *flags: str) -> tuple[int, dict[str, dict[str, Any]]]:
    proc = cli(["doctor", "--profile", str(DOCS.parent / "scripts" / "lab" / "profile.yaml"), str(lab.model),
                *flags, "--json"], home, timeout=120)
    return proc.returncode, {c["check"]: c for c in json.loads(proc.stdout)}


def test_doctor_against_the_labs_real_slurm(lab: Lab, home: Path) -> None:
    rc, ok = _doctor(lab, home, "--partition", lab.partition, "--nodes", "2", "--gpus-per-node", "2")
    assert rc == 0, ok
    assert ok["slurm"]["status"] == "ok" and ok["partition"]["status"] == "ok" and ok["fit"]["status"] == "ok", ok
    assert ok["environment"]["status"] in ("ok", "warn") and ok["model"]["status"] == "ok", ok

    rc, missing = _doctor(lab, home, "--partition", "no-such-partition")
    assert rc == 2 and missing["partition"]["status"] == "fail", missing
    assert "no-such-partition" in missing["partition"]["detail"]

    rc, big = _doctor(lab, home, "--partition", lab.partition, "--nodes", "1", "--gpus-per-node", "8")
    assert rc == 2 and big["fit"]["status"] == "fail" and "8" in big["fit"]["detail"], big


def test_an_interface_the_nodes_lack_fails_the_job_naming_it(lab: Lab, home: Path) -> None:
    """No vLLM starts: the node program names the interface before Ray."""
    proc = cli(["submit", *lab_serve_flags(lab), "--interface", "ib9", "--wait", "--timeout", "240"], home, timeout=300)
    assert proc.returncode == 4, (proc.stdout, proc.stderr[-2000:])
    jid = _job_id(proc.stdout)
    st = json.loads(cli(["status", jid, "--json"], home).stdout)
    st = st[0] if isinstance(st, list) else st
    assert st["phase"] == "FAILED" and "ib9" in st["reason"], st
    assert_no_processes(jid)
