"""The head's timeline helpers: Slurm's times asked beside the critical path, and the first
completion probed directly, recorded, never failing the job, and never holding up a stop."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from slurm_vllm import slurm
from slurm_vllm.errors import SlurmCommandError
from slurm_vllm.jobdir import JobDir, Phase, Run, write_state
from slurm_vllm.node import moments
from slurm_vllm.timeline import FIRST_COMPLETION, STARTED, SUBMITTED

KEY = "sk-probe"


class _Completions(BaseHTTPRequestHandler):
    answer: tuple[int, dict[str, object]] = (200, {"choices": [{"text": "!"}]})
    seen: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        status, obj = type(self).answer
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Completions.seen = []
    _Completions.answer = (200, {"choices": [{"text": "!"}]})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def jd(tmp_path: Path) -> JobDir:
    d = JobDir(tmp_path / "job").create()
    write_state(d, Run("42"), Phase.LOADING_MODEL)
    return d


def test_the_probe_asks_for_one_token_with_the_key_past_any_proxy(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # would refuse: the probe must go direct
    assert moments.probe_completion(server, KEY, "tiny") == (True, "")
    (req,) = _Completions.seen
    assert req == {"path": "/v1/completions", "auth": f"Bearer {KEY}", "model": "tiny", "prompt": "Hello",
                   "max_tokens": 1, "temperature": 0}


def test_a_refused_probe_says_vllms_words(server: str) -> None:
    _Completions.answer = (400, {"error": {"message": "This model does not support Completions API"}})
    ok, why = moments.probe_completion(server, KEY, "embedder")
    assert not ok and why == "HTTP 400: This model does not support Completions API"
    _Completions.answer = (200, {"choices": []})
    assert moments.probe_completion(server, KEY, "m") == (False, "the answer holds no choice")
    ok, why = moments.probe_completion("http://127.0.0.1:9", KEY, "m", timeout=2)
    assert not ok and why.startswith("no answer")


def test_first_completion_is_recorded_ok_or_failed_and_never_raises(jd: JobDir) -> None:
    logs: list[str] = []
    stop = threading.Event()
    assert moments.first_completion(jd, Run("42"), "http://x", KEY, "m", stop_event=stop, alive=lambda: True,
                                    log=logs.append, probe=lambda *a: (True, ""))
    state = jd.read_state(Run("42"))
    assert state is not None and [(m.name, m.ok) for m in state.timeline] == [(FIRST_COMPLETION, True)]
    assert state.phase is Phase.LOADING_MODEL and "first completion answered" in logs[-1]

    other = JobDir(jd.path.parent / "other").create()
    write_state(other, Run("43"), Phase.LOADING_MODEL)
    assert not moments.first_completion(other, Run("43"), "http://x", KEY, "m", stop_event=stop, alive=lambda: True,
                                        log=logs.append, probe=lambda *a: (False, "HTTP 404"))
    state = other.read_state(Run("43"))
    assert state is not None and (state.timeline[0].ok, state.timeline[0].detail) == (False, "HTTP 404")
    assert "serving anyway" in logs[-1] and KEY not in "".join(logs)


def test_a_stop_during_the_probe_is_acted_on_at_once(jd: JobDir) -> None:
    stop = threading.Event()

    def slow(*_a: object) -> tuple[bool, str]:
        time.sleep(5)
        return True, ""

    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert not moments.first_completion(jd, Run("42"), "http://x", KEY, "m", stop_event=stop, alive=lambda: True,
                                        log=lambda _m: None, probe=slow)
    assert time.monotonic() - t0 < 2
    state = jd.read_state(Run("42"))
    assert state is not None and state.timeline == []  # no mark for a probe that never finished
    dead = moments.first_completion(jd, Run("42"), "http://x", KEY, "m", stop_event=threading.Event(),
                                    alive=lambda: False, log=lambda _m: None, probe=slow)
    assert dead is False


def test_slurm_times_are_recorded_from_a_helper_thread(jd: JobDir) -> None:
    logs: list[str] = []
    t = moments.ask_slurm_times(jd, Run("42"), logs.append,
                                job_times=lambda jid, timeout: slurm.JobTimes(1000.0, 1012.0))
    t.join(5)
    state = jd.read_state(Run("42"))
    assert state is not None and [(m.name, m.at) for m in state.timeline] == [(SUBMITTED, 1000.0), (STARTED, 1012.0)]
    assert state.phase is Phase.LOADING_MODEL and "queued 12s" in logs[-1]


def test_slurm_unreachable_from_the_node_only_logs(jd: JobDir) -> None:
    logs: list[str] = []

    def refuse(jid: str, timeout: float) -> slurm.JobTimes:
        raise SlurmCommandError(["squeue"], 1, "slurm_load_jobs error: Unable to contact slurm controller")

    moments.ask_slurm_times(jd, Run("42"), logs.append, job_times=refuse).join(5)
    state = jd.read_state(Run("42"))
    assert state is not None and state.timeline == [] and "unknown" in logs[-1]
