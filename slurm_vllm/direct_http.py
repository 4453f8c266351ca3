"""HTTP to the job's own endpoint, never through a proxy.

Login and compute nodes often set ``http_proxy``/``https_proxy`` for model downloads. A request
to a compute node must not follow them: the proxy usually cannot reach the node (a healthy
server would look dead), and the job's API key would travel to the proxy in clear text. Every
request this package sends to a job's endpoint goes through :func:`get`, :func:`post` or
:func:`openai_http_client`, which ignore the environment's proxy settings.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

#: An opener without the environment's proxies (urllib's default opener reads them).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def root_url(base_url: str) -> str:
    """A server's root from its OpenAI base URL (``http://h:p/v1`` -> ``http://h:p``), where
    ``/health`` and ``/metrics`` live."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def get(url: str, api_key: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url`` directly; (status, body). An HTTP error status is returned, not raised.

    Connection failures raise ``OSError`` (``urllib.error.URLError`` is one).
    """
    return _send(urllib.request.Request(url), api_key, timeout)


def post(url: str, payload: Any = None, api_key: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """POST ``payload`` as JSON (or an empty body) to ``url`` directly; like :func:`get`."""
    data = b"" if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    return _send(req, api_key, timeout)


def _send(req: urllib.request.Request, api_key: str | None, timeout: float) -> tuple[int, bytes]:
    """One request without proxies, the key as a bearer token; an HTTP error is a status."""
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read() if exc.fp is not None else b""


def openai_http_client(openai: Any) -> Any:
    """The ``http_client`` for an ``openai.OpenAI`` client: openai's own defaults (timeouts,
    connection limits), but not trusting the environment's proxy variables as httpx does."""
    factory = getattr(openai, "DefaultHttpxClient", None)
    if factory is None:  # an old openai: a plain httpx client
        import httpx  # noqa: PLC0415 - comes with openai

        factory = httpx.Client
    return factory(trust_env=False)
