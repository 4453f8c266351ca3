"""`metrics`: every replica's and the router's Prometheus text, read with prometheus_client."""

from __future__ import annotations

from slurm_vllm.metrics import read_metrics, table_rows

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m"}} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} 0.25
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{engine="0",model_name="m"}} {tokens}
# TYPE vllm:request_success counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} 3.0
vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} 4.0
"""
ROUTER = """# TYPE vllm_router_processed_requests counter
vllm_router_processed_requests_total{worker="http://10.0.0.1:8000"} 5
vllm_router_processed_requests_total{worker="http://10.0.0.2:8000"} 6
# TYPE vllm_router_requests counter
vllm_router_requests_total{route="/v1/chat/completions"} 11
"""


def test_replicas_and_router_are_read_and_rates_computed() -> None:
    readings = {"http://10.0.0.1:8000/metrics": [VLLM.format(running=2, tokens=100.0),
                                                 VLLM.format(running=2, tokens=150.0)],
                "http://10.0.0.2:8000/metrics": [None, None],
                "http://10.0.0.9:9000/metrics": [ROUTER]}
    seen: list[tuple[str, str | None]] = []

    def fetch(url: str, key: str | None) -> str | None:
        seen.append((url, key))
        return readings[url].pop(0)

    m = read_metrics([(0, "http://10.0.0.1:8000/v1"), (1, "http://10.0.0.2:8000/v1")], "k",
                     router_url="http://10.0.0.9:9000/v1", interval=0.5, fetch=fetch, sleep=lambda s: None)
    first, second = m.replicas
    assert (first.answering, first.running, first.waiting, first.kv_cache_usage) == (True, 2.0, 1.0, 0.25)
    assert first.requests_finished == 7.0 and first.generated_tokens == 150.0
    assert first.tokens_per_second is not None and first.tokens_per_second > 0
    assert (first.requests_routed, second.requests_routed) == (5.0, 6.0)
    assert not second.answering and second.running is None
    assert m.router_answering and m.router_requests == {"/v1/chat/completions": 11.0}
    assert all(key == "k" for _, key in seen)
    rows = list(table_rows(m))
    assert rows[0][2:6] == ["yes", "2", "1", "25.0%"] and rows[1][2:4] == ["no", "-"]


def test_a_job_without_replicas_has_no_router_line() -> None:
    m = read_metrics([(0, "http://h:1/v1")], None, interval=0, fetch=lambda u, k: None)
    assert m.router_answering is None and m.replicas[0].answering is False
