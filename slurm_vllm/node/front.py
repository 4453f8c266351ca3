"""The authenticating front of a job with replicas: the only port clients reach.

vllm-router checks no client key and its admin routes (``/add_worker``, ``/remove_worker``,
``/list_workers``, ``/flush_cache``, ...) answer anyone who reaches its port: on a shared
cluster network a stranger could register a worker and receive every user's prompts. So the
router listens on loopback only, and this small reverse proxy is what the job publishes:

* the OpenAI routes (``/v1/...``) pass only with the job's key (compared in constant time), and
  go to the router with the client's own ``Authorization`` header, which the router forwards to
  the replicas (each of them checks the key again);
* ``/metrics`` (the router's Prometheus exporter) needs the key too;
* ``/health`` answers without a key, as vLLM's own does (no data behind it);
* everything else, the router's admin routes included, is refused with 404.

Responses stream through chunk by chunk (server-sent events for ``stream: true``). Built on
aiohttp, which every vLLM installation already has. Run as its own process
(``python -m slurm_vllm.node.front``) so the node program stays small; the key is read from
the job's key file, never from the command line.
"""

from __future__ import annotations

import argparse
import hmac
import sys
from pathlib import Path
from typing import Any

#: Headers that belong to one hop and must not be forwarded (RFC 9110 §7.6.1), plus Host.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length"})

UNAUTHORIZED = {"error": {"message": "invalid or missing API key: send 'Authorization: Bearer <key>'",
                          "type": "invalid_request_error", "code": 401}}
NOT_FOUND = {"error": {"message": "not found: this endpoint serves the OpenAI routes under /v1",
                       "type": "invalid_request_error", "code": 404}}


def route(path: str) -> str | None:
    """Which upstream serves ``path``: ``router``, ``metrics``, ``health``; None: refused."""
    if path == "/v1" or path.startswith("/v1/"):
        return "router"
    if path == "/metrics":
        return "metrics"
    if path == "/health":
        return "health"
    return None


def key_matches(header: str | None, key: bytes | None) -> bool:
    """True when ``header`` is ``Bearer <key>`` (constant time); always True without a key."""
    if key is None:
        return True
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key)


def forward_headers(headers: Any) -> dict[str, str]:
    """The request's or response's headers without the hop-by-hop ones."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def make_app(router: str, metrics: str, key: bytes | None) -> Any:
    """The aiohttp application: ``router`` and ``metrics`` are the loopback base URLs."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web  # noqa: PLC0415 - node side only

    session_key = web.AppKey("session", ClientSession)

    async def open_session(app: web.Application) -> Any:
        # trust_env=False: the upstream is on loopback, never behind the environment's proxy.
        app[session_key] = ClientSession(connector=TCPConnector(limit=0), trust_env=False, auto_decompress=False,
                                         timeout=ClientTimeout(total=None, sock_connect=10))
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        which = route(request.path)
        if which is None:
            return web.json_response(NOT_FOUND, status=404)
        if which != "health" and not key_matches(request.headers.get("Authorization"), key):
            return web.json_response(UNAUTHORIZED, status=401)
        base = metrics if which == "metrics" else router
        url = base + request.rel_url.path_qs
        # OpenAI request bodies are small JSON: read whole, so they go on with a Content-Length
        # (a streamed body would be sent chunked, and cost the router a slower parse).
        body = await request.read() if request.can_read_body else None
        try:
            async with app[session_key].request(request.method, url, headers=forward_headers(request.headers),
                                              data=body, allow_redirects=False) as upstream:
                response = web.StreamResponse(status=upstream.status, headers=forward_headers(upstream.headers))
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except OSError as exc:
            return web.json_response({"error": {"message": f"the router did not answer: {exc}",
                                                "type": "server_error", "code": 502}}, status=502)

    app = web.Application(client_max_size=1024**3)
    app.cleanup_ctx.append(open_session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm_vllm.node.front", description=__doc__.split("\n")[0])
    p.add_argument("--host", required=True, help="address to listen on (the node's cluster address)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--router", required=True, help="the router's loopback base URL")
    p.add_argument("--metrics", required=True, help="the router's Prometheus base URL (loopback)")
    p.add_argument("--key-file", type=Path, help="the job's API key file; omit to serve without a key")
    args = p.parse_args(argv)
    key = args.key_file.read_text(encoding="utf-8").strip().encode() if args.key_file else None
    from aiohttp import web  # noqa: PLC0415

    print(f"slurm_vllm front: http://{args.host}:{args.port} -> {args.router}"
          + ("" if key else " (no API key)"), flush=True)
    web.run_app(make_app(args.router.rstrip("/"), args.metrics.rstrip("/"), key), host=args.host,
                port=args.port, print=None, access_log=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
