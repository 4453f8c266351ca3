"""The authenticating front, served for real (aiohttp) in front of a recording stand-in router:
the key is checked, the admin routes are refused, streams pass through chunk by chunk."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web  # the node side's web library (it comes with vLLM and vllm-router)
from aiohttp.test_utils import TestClient, TestServer

from slurm_vllm.node import front

KEY = b"k3y-for-the-front"


def test_routes_only_the_openai_api_metrics_and_health() -> None:
    assert front.route("/v1/chat/completions") == "router" and front.route("/v1") == "router"
    assert front.route("/metrics") == "metrics" and front.route("/health") == "health"
    for admin in ("/add_worker", "/remove_worker", "/list_workers", "/flush_cache", "/get_loads", "/workers/x",
                  "/v1x", "/", "/health_generate"):
        assert front.route(admin) is None, admin


def test_key_check() -> None:
    assert front.key_matches("Bearer " + KEY.decode(), KEY)
    assert front.key_matches("bearer " + KEY.decode(), KEY)
    for bad in (None, "", "Bearer", "Bearer wrong", "Basic " + KEY.decode(), KEY.decode()):
        assert not front.key_matches(bad, KEY), bad
    assert front.key_matches(None, None)  # a job without a key


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_front(check: Any, key: bytes | None = KEY) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        seen.append({"path": request.path_qs, "auth": request.headers.get("Authorization"),
                     "body": await request.read()})
        if request.path == "/v1/stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.05)
            await resp.write_eof()
            return resp
        return web.json_response({"path": request.path}, status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream)
    async with TestServer(app) as up:
        base = str(up.make_url("")).rstrip("/")
        async with TestClient(TestServer(front.make_app(base, base, key))) as client:
            await check(client)
    return seen


def test_requests_without_the_right_key_never_reach_the_router() -> None:
    async def check(client: TestClient) -> None:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = await client.post("/v1/chat/completions", json={"x": 1}, headers=headers)
            assert r.status == 401 and "API key" in (await r.json())["error"]["message"]
        r = await client.get("/metrics")
        assert r.status == 401
        for path in ("/add_worker?url=http://evil:1", "/list_workers", "/flush_cache"):
            r = await client.post(path, headers={"Authorization": "Bearer " + KEY.decode()})
            assert r.status == 404, path

    assert run(_with_front(check)) == []


def test_the_key_holder_is_forwarded_with_its_header_and_body() -> None:
    async def check(client: TestClient) -> None:
        r = await client.post("/v1/completions?x=1", json={"prompt": "hi"},
                              headers={"Authorization": "Bearer " + KEY.decode()})
        assert r.status == 200 and (await r.json()) == {"path": "/v1/completions"}
        r = await client.get("/health")  # no key needed, as vLLM's own
        assert r.status == 200

    seen = run(_with_front(check))
    assert seen[0]["path"] == "/v1/completions?x=1" and seen[0]["auth"] == "Bearer " + KEY.decode()
    assert seen[0]["body"] == b'{"prompt": "hi"}'
    assert seen[1]["path"] == "/health"


def test_a_stream_passes_through_chunk_by_chunk() -> None:
    got: list[tuple[float, bytes]] = []

    async def check(client: TestClient) -> None:
        r = await client.get("/v1/stream", headers={"Authorization": "Bearer " + KEY.decode()})
        assert r.headers["Content-Type"].startswith("text/event-stream")
        loop = asyncio.get_running_loop()
        async for chunk in r.content.iter_any():
            got.append((loop.time(), chunk))

    run(_with_front(check))
    assert b"".join(c for _, c in got) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert len(got) >= 2 and got[-1][0] - got[0][0] > 0.05  # not buffered into one piece


def test_without_a_job_key_the_api_is_open_but_admin_routes_are_not() -> None:
    async def check(client: TestClient) -> None:
        assert (await client.get("/v1/models")).status == 200
        assert (await client.post("/add_worker?url=x")).status == 404

    run(_with_front(check, key=None))
