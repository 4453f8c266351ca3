"""Requests to a job's endpoint never go through a proxy from the environment.

A fake vLLM answers on one local port; a recording "proxy" listens on another and notes every
connection. With ``http_proxy``/``https_proxy``/``all_proxy`` pointing at the proxy, the node's
readiness probe, the login side's health check and the OpenAI client must all reach the server
directly, and the proxy must see nothing (least of all the key).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slurm_vllm import direct_http, job
from slurm_vllm.node import serve

KEY = "sk-test-key"


class _Vllm(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            body = b""
        elif self.path == "/v1/models" and self.headers.get("Authorization") == f"Bearer {KEY}":
            body = json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0,
                                                           "owned_by": "vllm"}]}).encode()
        else:
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Vllm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """A listener that records what reaches it and answers nothing; set as every proxy variable."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    seen: list[bytes] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.settimeout(1.0)
            try:
                seen.append(conn.recv(4096))
            except OSError:
                seen.append(b"")
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    yield seen
    sock.close()


def test_the_proxy_fixture_really_catches_a_proxied_request(server: str, proxy: list[bytes]) -> None:
    import urllib.request

    with pytest.raises(OSError):  # a default opener (built now: it reads the proxies then) uses it
        urllib.request.build_opener().open(f"{server}/health", timeout=2)
    assert proxy, "the recording proxy saw nothing: the test below would prove nothing"


def test_the_node_readiness_probe_goes_direct(server: str, proxy: list[bytes]) -> None:
    assert serve.probe(server, KEY, timeout=3) == "tiny"
    assert proxy == []


def test_the_login_health_check_goes_direct(server: str, proxy: list[bytes]) -> None:
    assert job.probe_health(server + "/v1", KEY, timeout=3) == (True, "")
    assert direct_http.get(f"{server}/v1/models", "wrong", timeout=3)[0] == 401
    assert proxy == []


def test_the_openai_client_goes_direct(server: str, proxy: list[bytes]) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, http_client=direct_http.openai_http_client(openai),
                           max_retries=0, timeout=5)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert proxy == []


def test_job_openai_client_uses_the_direct_client(server: str, proxy: list[bytes], monkeypatch, tmp_path) -> None:
    openai = pytest.importorskip("openai")
    endpoint = job.Endpoint(base_url=server + "/v1", api_key=KEY, model="tiny", host="127.0.0.1",
                            port=int(server.rsplit(":", 1)[1]))
    monkeypatch.setattr(job.Job, "endpoint", property(lambda self: endpoint))
    handle = job.Job.__new__(job.Job)
    client = handle.openai_client(max_retries=0, timeout=5)
    assert isinstance(client, openai.OpenAI)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert proxy == []
