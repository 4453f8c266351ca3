"""A job's load, read from Prometheus ``/metrics``: every replica's vLLM and the router.

Parsed with ``prometheus_client`` (never by hand). Rates (generated tokens per second) need two
readings: :func:`read_metrics` takes them ``interval`` seconds apart. Every request goes direct
(direct_http), never through a proxy: the key travels with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from slurm_vllm import direct_http

#: vLLM's metric families read here (the ``_total`` suffix belongs to the samples).
RUNNING, WAITING, KV = "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
GENERATED, FINISHED = "vllm:generation_tokens", "vllm:request_success"
#: vllm-router's: requests it sent to each worker.
ROUTED = "vllm_router_processed_requests"

Fetch = Callable[[str, "str | None"], "str | None"]


def fetch_text(url: str, api_key: str | None) -> str | None:
    """``/metrics`` text, or None when it does not answer."""
    try:
        status, body = direct_http.get(url, api_key, timeout=5.0)
    except OSError:
        return None
    return body.decode(errors="replace") if status == 200 else None


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], from Prometheus text (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415 - light, but only here

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _sum(found: Mapping[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    values = found.get(name)
    return sum(v for _, v in values) if values else None


@dataclass
class ReplicaMetrics:
    """One vLLM server's load (None: it did not answer, or does not export that metric)."""

    index: int
    url: str
    answering: bool = False
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    generated_tokens: float | None = None  # since vLLM started
    tokens_per_second: float | None = None
    requests_finished: float | None = None
    requests_routed: float | None = None  # by the router, to this replica


@dataclass
class JobMetrics:
    """Every replica, and the router's own counters when the job has one."""

    replicas: list[ReplicaMetrics] = field(default_factory=list)
    router_answering: bool | None = None  # None: the job has no router
    router_requests: dict[str, float] = field(default_factory=dict)  # route -> count
    taken_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_replica(index: int, url: str, text: str | None) -> ReplicaMetrics:
    m = ReplicaMetrics(index=index, url=url, answering=text is not None)
    if text is None:
        return m
    try:
        found = samples(text)
    except ValueError:
        return m
    m.running, m.waiting = _sum(found, RUNNING), _sum(found, WAITING)
    m.kv_cache_usage = _sum(found, KV)
    m.generated_tokens = _sum(found, GENERATED + "_total")
    m.requests_finished = _sum(found, FINISHED + "_total")
    return m


def read_metrics(replicas: Sequence[tuple[int, str]], api_key: str | None, *, router_url: str | None = None,
                 interval: float = 1.0, fetch: Fetch = fetch_text,
                 sleep: Callable[[float], None] = time.sleep) -> JobMetrics:
    """Read every replica (``(index, base URL)``) twice, ``interval`` apart, and the router.

    ``router_url`` is the job's public base URL when it has a router: the front passes
    ``/metrics`` on to the router's exporter (with the key).
    """
    first = {i: fetch(direct_http.root_url(u) + "/metrics", api_key) for i, u in replicas}
    t0 = time.monotonic()
    if interval > 0:
        sleep(interval)
    out = JobMetrics()
    for i, u in replicas:
        m = _read_replica(i, u, fetch(direct_http.root_url(u) + "/metrics", api_key))
        before = _read_replica(i, u, first[i]).generated_tokens
        took = max(time.monotonic() - t0, 1e-6)
        if m.generated_tokens is not None and before is not None:
            m.tokens_per_second = max(m.generated_tokens - before, 0.0) / took
        out.replicas.append(m)
    if router_url is not None:
        text = fetch(direct_http.root_url(router_url) + "/metrics", api_key)
        out.router_answering = text is not None
        if text is not None:
            _add_router(out, text)
    return out


def _add_router(out: JobMetrics, text: str) -> None:
    try:
        found = samples(text)
    except ValueError:
        return
    per_worker = {labels.get("worker", ""): v for labels, v in found.get(ROUTED + "_total", [])}
    for m in out.replicas:
        m.requests_routed = per_worker.get(direct_http.root_url(m.url), 0.0 if per_worker else None)
    for labels, v in found.get("vllm_router_requests_total", []):
        out.router_requests[labels.get("route", "?")] = v


def table_rows(m: JobMetrics) -> Iterable[list[str]]:
    """Rows for a terminal table: replica, running, waiting, KV cache, tokens/s, routed."""
    def num(v: float | None, fmt: str = "{:.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    for r in m.replicas:
        yield [str(r.index), r.url, "yes" if r.answering else "no", num(r.running), num(r.waiting),
               num(None if r.kv_cache_usage is None else 100 * r.kv_cache_usage, "{:.1f}%"),
               num(r.tokens_per_second, "{:.1f}"), num(r.requests_finished), num(r.requests_routed)]
