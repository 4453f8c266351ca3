"""The serving step without vLLM: command lines, readiness, endpoint, failure and stop paths.

The ``vllm`` executable is replaced at the process boundary by a small Python HTTP server that
behaves like vLLM's API on the points the head relies on (``/health``; ``/v1/models`` behind a
bearer key taken from ``VLLM_API_KEY``), or by one that dies the way a broken model does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import JobDir, Phase, Run
from slurm_vllm.node import lifecycle, serve
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import Stopper
from slurm_vllm.node.ports import plan_ports
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec

ENDED, FAILED, READY = Phase.ENDED.value, Phase.FAILED.value, Phase.READY.value

KEY = "s3cret-key-for-tests"

FAKE_VLLM = r'''#!{python}
"""Stands in for `vllm serve`: answers like vLLM's API after a delay, or fails like a bad model."""
import http.server, json, os, subprocess, sys, time

argv = sys.argv[1:]
with open(os.environ["FAKE_ARGV_FILE"], "w") as f:
    json.dump({{"argv": argv, "has_key": "VLLM_API_KEY" in os.environ}}, f)
mode = os.environ.get("FAKE_MODE", "serve")
child = subprocess.Popen(["sleep", "300"])  # a vLLM child process (engine/worker) in the group
with open(os.environ["FAKE_PIDS_FILE"], "w") as f:
    f.write(f"{{os.getpid()}} {{child.pid}}\n")
print("INFO starting fake vllm", flush=True)
time.sleep(float(os.environ.get("FAKE_DELAY", "0.5")))
if mode == "fail":
    print("Traceback (most recent call last):", flush=True)
    print("ValueError: The checkpoint has model type `bogus` but Transformers does not know it", flush=True)
    sys.exit(3)
if "--headless" in argv:  # a replica's other node: no API, it runs until stopped (or crashes)
    time.sleep(1.5 if mode == "crash-later" else 300)
    sys.exit(7)
host = argv[argv.index("--host") + 1]
port = int(argv[argv.index("--port") + 1])
key = os.environ.get("VLLM_API_KEY")
model = argv[argv.index("--served-model-name") + 1] if "--served-model-name" in argv else argv[1]


class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200); self.end_headers(); return
        if self.path == "/v1/models":
            if key and self.headers.get("Authorization") != f"Bearer {{key}}":
                self.send_response(401); self.end_headers(); return
            body = json.dumps({{"data": [{{"id": model}}]}}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body); return
        self.send_response(404); self.end_headers()


srv = http.server.HTTPServer((host, port), H)
if mode == "crash-later":
    import threading
    threading.Timer(1.5, lambda: os._exit(7)).start()
srv.serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of this test process counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- command lines


def test_key_goes_through_the_environment_only() -> None:
    env = serve.serve_env({"PATH": "/bin", "VLLM_API_KEY": "leaked-from-shell"}, {"VLLM_HOST_IP": "10.0.0.5"},
                          api_key=KEY, ray_address="10.0.0.5:20000")
    assert env["VLLM_API_KEY"] == KEY and env["RAY_ADDRESS"] == "10.0.0.5:20000"
    assert env["VLLM_HOST_IP"] == "10.0.0.5" and env["PATH"] == "/bin"
    no_key = serve.serve_env({"VLLM_API_KEY": "leaked-from-shell"}, {}, api_key=None)
    assert "VLLM_API_KEY" not in no_key and "RAY_ADDRESS" not in no_key


def test_exit_reasons() -> None:
    assert serve.exit_reason(3, "while loading the model") == "vllm exited with code 3 while loading the model"
    assert "SIGKILL" in serve.exit_reason(-9, "while serving")


# Shapes of vLLM 0.32 failure logs: the root cause in a worker, then wrappers pointing at it.
VLLM_FAILURE_LOG = """\
(APIServer pid=1) WARNING 11-29 09:41:24 [system_utils.py:255] Found ulimit of 20000 ... `OSError: [Errno 24] Too many open files`.
(APIServer pid=1) INFO 11-29 09:41:30 [model.py:1] Resolved architecture: LlamaForCausalLM
(Worker pid=9) ERROR 11-29 09:41:39 [multiproc_executor.py:953] Traceback (most recent call last):
(Worker pid=9) ERROR 11-29 09:41:39 [multiproc_executor.py:953]     raise ValueError(
(Worker pid=9) ERROR 11-29 09:41:39 [multiproc_executor.py:953] ValueError: Following weights were not initialized from checkpoint: {'model.layers.5.mlp'}
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""
RAY_FAILURE_LOG = """\
(EngineCore pid=5) ERROR 11-29 09:34:10 [core.py:1510] ray.exceptions.RayTaskError(KeyError): \x1b[36mray::RayWorkerProc.get_node_and_physical_gpu_ids()\x1b[39m (pid=11428, ip=127.0.0.2)
(EngineCore pid=5) ERROR 11-29 09:34:10 [core.py:1510] KeyError: 'vllm_cpu'
ray.exceptions.ActorHandleNotFoundError: Failed to find a corresponding actor handle for f02f
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_error_summary_finds_the_root_cause_not_the_wrappers() -> None:
    assert serve.error_summary(VLLM_FAILURE_LOG).startswith(
        "ValueError: Following weights were not initialized from checkpoint")
    assert serve.error_summary(RAY_FAILURE_LOG) == "KeyError: 'vllm_cpu'"  # the inner error, not Ray's wrapper
    wrapper_only = RAY_FAILURE_LOG.replace("KeyError: 'vllm_cpu'", "")
    summary = serve.error_summary(wrapper_only)
    assert summary.startswith("ray.exceptions.RayTaskError(KeyError): ray::RayWorkerProc")
    assert "\x1b" not in summary  # no terminal colours in state.json
    assert serve.error_summary("INFO all fine\nWARNING ValueError: not really") == ""


def test_log_tail_keeps_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = serve.log_tail(log, 30).splitlines()
    assert tail[0] == "line 70" and tail[-1] == "line 99" and len(tail) == 30
    assert serve.log_tail(tmp_path / "missing.log") == ""


# --------------------------------------------------------------------------- the head's run


@pytest.fixture
def head(tmp_path: Path) -> SimpleNamespace:
    """A job directory, a fake `vllm` on PATH, and a node context for the head."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    jobdir = JobDir(tmp_path / "job").create()
    jobdir.write_secret(jobdir.api_key, KEY)
    (jobdir.job_id_file).write_text("4242\n")
    spec = ServeSpec("org/tiny", nodes=2, gpus_per_node=1, served_name="tiny", ready_timeout=30)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_ARGV_FILE": str(tmp_path / "argv.json"),
        "FAKE_PIDS_FILE": str(tmp_path / "pids"),
    }
    topo = Topology(job_id="4242", rank=0, num_nodes=2, hostname="node-a", hosts=("node-a", "node-b"),
                    head_host="node-a", head_ip="127.0.0.1", node_ip="127.0.0.1", interface="lo")
    ctx = NodeContext(spec=spec, jobdir=jobdir, run=Run("4242", 0), topology=topo, ports=plan_ports("4242"), env=env,
                      stopper=Stopper(), ray_address="127.0.0.1:6380", temp_dir=str(tmp_path / "ray"))
    return SimpleNamespace(ctx=ctx, tmp=tmp_path, jobdir=jobdir)


@pytest.fixture(autouse=True, scope="module")
def as_the_node_program() -> Iterator[None]:
    """This process keeps its orphans as the node program does (a subreaper): a vLLM child
    whose leader died is still this job's, and its stop finds it."""
    lifecycle.become_subreaper()
    yield
    lifecycle.become_subreaper(False)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve, "POLL_INTERVAL", 0.2)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def _run_in_thread(fn, ctx) -> tuple[threading.Thread, dict]:  # type: ignore[no-untyped-def]
    result: dict = {}

    def target() -> None:
        result["rc"] = fn(ctx)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def _state(jobdir: JobDir) -> dict | None:
    """state.json as the protocol's JSON (None while there is none)."""
    return json.loads(jobdir.state.read_text()) if jobdir.state.exists() else None


def _wait_phase(jobdir: JobDir, phase: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(jobdir) or {}
        if state.get("phase") == phase:
            return state
        time.sleep(0.1)
    raise AssertionError(f"phase {phase} not reached; state: {_state(jobdir)}")


def _pids(tmp: Path) -> list[int]:
    return [int(p) for p in (tmp / "pids").read_text().split()]


def test_ready_writes_endpoint_then_stop_ends_and_leaves_no_process(head: SimpleNamespace) -> None:
    ctx, jobdir = head.ctx, head.jobdir
    thread, result = _run_in_thread(serve.run_head_serving, ctx)
    state = _wait_phase(jobdir, READY)
    assert state["job_id"] == "4242"

    endpoint = json.loads(jobdir.endpoint.read_text())
    port = ctx.ports.api
    assert endpoint == {"base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny", "host": "node-a",
                        "port": port, "job_id": "4242", "restart": 0}
    assert stat.S_IMODE(jobdir.endpoint.stat().st_mode) == 0o600

    # vLLM got the key through its environment, never on the command line or in its log
    seen = json.loads((head.tmp / "argv.json").read_text())
    assert seen["has_key"] is True
    assert KEY not in " ".join(seen["argv"])
    assert "--distributed-executor-backend" in seen["argv"]
    assert KEY not in jobdir.vllm_log().read_text()

    # the endpoint really is behind the key
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    assert err.value.code == 401

    leader, child = _pids(head.tmp)
    ctx.stopper.stop("cancelled")
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert result["rc"] == 0
    state = _state(jobdir)
    assert state["phase"] == ENDED and state["reason"] == "cancelled"
    assert not pid_alive(leader) and not pid_alive(child), "vLLM's process group outlived the stop"


def test_vllm_exiting_while_loading_fails_with_exit_code_and_log_tail(head: SimpleNamespace) -> None:
    ctx, jobdir = head.ctx, head.jobdir
    ctx.env["FAKE_MODE"] = "fail"
    rc = serve.run_head_serving(ctx)
    assert rc == 1
    state = _state(jobdir)
    assert state["phase"] == FAILED
    assert state["exit_code"] == 3
    assert "vllm exited with code 3 while loading the model" in state["reason"]
    assert "model type `bogus`" in state["reason"]  # vLLM's own words reach the reason
    assert "model type `bogus`" in state["log_tail"]
    assert not jobdir.endpoint.exists()
    leader, child = _pids(head.tmp)
    assert not pid_alive(leader) and not pid_alive(child), "a child of the failed vLLM was left behind"


def test_vllm_dying_after_ready_fails_the_job(head: SimpleNamespace) -> None:
    ctx, jobdir = head.ctx, head.jobdir
    ctx.env["FAKE_MODE"] = "crash-later"
    rc = serve.run_head_serving(ctx)
    assert rc == 1
    state = _state(jobdir)
    assert state["phase"] == FAILED and state["exit_code"] == 7
    assert "while serving" in state["reason"]
    assert READY in state["phase_times"]  # it was ready first
    leader, child = _pids(head.tmp)
    assert not pid_alive(child)


def test_not_ready_before_the_deadline_fails_and_stops_vllm(head: SimpleNamespace) -> None:
    ctx, jobdir = head.ctx, head.jobdir
    ctx.spec.serve.ready_timeout = 1.0
    ctx.env["FAKE_DELAY"] = "60"
    rc = serve.run_head_serving(ctx)
    assert rc == 1
    state = _state(jobdir)
    assert state["phase"] == FAILED and "not ready after 1 s" in state["reason"]
    leader, child = _pids(head.tmp)
    assert not pid_alive(leader) and not pid_alive(child)


def test_stop_while_loading_ends_without_endpoint(head: SimpleNamespace) -> None:
    ctx, jobdir = head.ctx, head.jobdir
    ctx.env["FAKE_DELAY"] = "60"
    thread, result = _run_in_thread(serve.run_head_serving, ctx)
    deadline = time.monotonic() + 10
    while not (head.tmp / "pids").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    ctx.stopper.stop("time limit")
    thread.join(timeout=60)
    assert result["rc"] == 0
    state = _state(jobdir)
    assert state["phase"] == ENDED and state["reason"] == "time limit"
    assert not jobdir.endpoint.exists()


def test_probe_needs_both_health_and_models(tmp_path: Path) -> None:
    """/health alone is not ready: /v1/models must answer too (with the key)."""
    import http.server

    models_ok = threading.Event()

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.end_headers()
            elif self.path == "/v1/models" and models_ok.is_set():
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    self.send_response(401)
                    self.end_headers()
                    return
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"data": [{"id": "m"}]}')
            else:
                self.send_response(503)
                self.end_headers()

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert serve.probe(base, KEY) is None
        models_ok.set()
        assert serve.probe(base, "wrong") is None
        assert serve.probe(base, KEY) == "m"
    finally:
        srv.shutdown()
    assert serve.probe(base, KEY, timeout=0.5) is None  # nothing listening


def test_stopping_vllm_kills_children_that_ignore_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"c = subprocess.Popen([sys.executable, '-c', 'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
        f"open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid))\n"
        "time.sleep(300)\n"
    )
    proc = serve.launch([sys.executable, str(script)], os.environ, tmp_path / "out.log")
    deadline = time.monotonic() + 10
    while not (tmp_path / "child").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int((tmp_path / "child").read_text())
    t0 = time.monotonic()
    rc = lifecycle.stop(proc, grace=1.0)
    assert rc == -signal.SIGKILL
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)


def test_headless_rank_reads_the_heads_rendezvous_port(head: SimpleNamespace) -> None:
    ctx, jobdir = head.ctx, head.jobdir
    ctx.spec = ServeSpec("org/tiny", nodes=2, gpus_per_node=1, backend="mp")
    ctx.rank = 1
    ctx.env["FAKE_DELAY"] = "60"
    (jobdir.head).write_text(json.dumps({"job_id": "4242", "ip": "127.0.0.9", "gcs_port": 20123,
                                         "api_port": 20124, "restart": 0}))
    thread, result = _run_in_thread(serve.run_mp_node, ctx)
    deadline = time.monotonic() + 10
    while not (head.tmp / "argv.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = json.loads((head.tmp / "argv.json").read_text())
    ctx.stop_event.set()
    thread.join(timeout=60)
    argv = seen["argv"]
    assert argv[argv.index("--master-addr") + 1] == "127.0.0.9"
    assert argv[argv.index("--master-port") + 1] == "20123"
    assert argv[argv.index("--node-rank") + 1] == "1" and "--headless" in argv
    assert seen["has_key"] is False  # a headless rank serves no API and needs no key
    assert (jobdir.logs / "vllm-1.log").exists()
    assert result["rc"] == 0
    assert _state(jobdir) is None  # only the head writes state.json


def test_vllm_exiting_from_the_same_scancel_is_a_stop_not_a_failure(head: SimpleNamespace) -> None:
    """scancel signals vLLM and the node program together; vLLM may notice first."""
    ctx, jobdir = head.ctx, head.jobdir
    ctx.env["FAKE_MODE"] = "crash-later"  # exits 1.5 s after it is ready

    def stop_soon_after_exit() -> None:
        _wait_phase(jobdir, READY)
        leader = _pids(head.tmp)[0]
        while pid_alive(leader):
            time.sleep(0.05)
        time.sleep(0.3)  # the node program's signal handler runs a moment later
        ctx.stopper.stop("cancelled")

    helper = threading.Thread(target=stop_soon_after_exit, daemon=True)
    helper.start()
    rc = serve.run_head_serving(ctx)
    helper.join(timeout=10)
    assert rc == 0
    state = _state(jobdir)
    assert state["phase"] == ENDED and state["reason"] == "cancelled"


def test_a_failure_stop_fails_the_job(head: SimpleNamespace) -> None:
    """The node program stops the step because a node left: FAILED with that reason."""
    ctx, jobdir = head.ctx, head.jobdir
    thread, result = _run_in_thread(serve.run_head_serving, ctx)
    _wait_phase(jobdir, READY)
    ctx.fail("node(s) labnode2 left the Ray cluster (1/2 alive)")
    thread.join(timeout=60)
    assert result["rc"] == 1
    state = _state(jobdir)
    assert state["phase"] == FAILED and "labnode2 left" in state["reason"]


def test_stop_grace_fits_inside_slurms_kill_wait() -> None:
    assert serve.stop_grace(None) == serve.STOP_GRACE  # outside Slurm, or KillWait unknown
    assert serve.stop_grace(30) == 30 - serve.TEARDOWN_BUDGET  # Slurm's default KillWait
    assert serve.stop_grace(120) == serve.STOP_GRACE
    assert serve.stop_grace(3) == serve.MIN_STOP_GRACE  # the lab's short KillWait


# --- the time-limit warning: drain, then end ---------------------------------------------


def test_the_drain_budget_uses_the_warnings_lead_time():
    assert serve.drain_budget(120) == 120 - serve.DRAIN_MARGIN - serve.TEARDOWN_BUDGET
    assert serve.drain_budget(5) == serve.MIN_STOP_GRACE  # a short warning still stops cleanly


def test_a_port_taken_since_it_was_planned_fails_with_the_port_named(head: SimpleNamespace) -> None:
    ctx = head.ctx
    with socket.socket() as s:
        s.bind(("", ctx.ports.api))
        s.listen()
        with pytest.raises(NodeError, match=f"port {ctx.ports.api} .*taken by another process"):
            serve.free_api_port(ctx)
    assert serve.free_api_port(ctx) == ctx.ports.api


def test_requests_in_flight_are_read_from_vllms_metrics() -> None:
    import http.server

    body = {"n": b'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
                 b'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
                 b'vllm:num_requests_waiting_by_reason{reason="capacity"} 1.0\n'
                 b'# HELP vllm:num_requests_running Number of requests\n'}

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body["n"])

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert serve.requests_in_flight(base, KEY) == 3  # running + waiting, the by-reason split not twice
        body["n"] = b'vllm:num_requests_running{engine="0"} 0.0\nvllm:num_requests_waiting{engine="0"} 0.0\n'
        assert serve.requests_in_flight(base, KEY) == 0
    finally:
        srv.shutdown()
    assert serve.requests_in_flight(base, KEY) is None  # nothing answers


def test_the_time_limit_drain_waits_for_the_requests_in_flight_then_stops_vllm(monkeypatch) -> None:
    """It needs no vLLM flag: the count comes from /metrics, the stop is the API server's SIGTERM."""
    counts = iter([2, 1, 0])
    monkeypatch.setattr(serve, "requests_in_flight", lambda base, key: next(counts))
    proc = lifecycle.OwnedProcess("vllm", ["sleep", "600"], os.environ)
    t0 = time.monotonic()
    assert serve.drain_then_stop(proc, "http://127.0.0.1:9", KEY, budget=30, poll=0.05) is True
    assert time.monotonic() - t0 < 10 and proc.poll() == -signal.SIGTERM
    monkeypatch.setattr(serve, "requests_in_flight", lambda base, key: 1)  # never drains
    proc = lifecycle.OwnedProcess("vllm", ["sleep", "600"], os.environ)
    assert serve.drain_then_stop(proc, "http://127.0.0.1:9", KEY, budget=0.3, poll=0.05) is False
    assert proc.poll() is not None
