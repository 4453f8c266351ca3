"""Latency through the job's one URL (front + vllm-router) against straight to a replica.

Short completions, interleaved (router, direct, router, ...; the order flips every pair) so that
load changes on the machine hit both alike. Prints the median and p95 of each and the ratios
router/direct (goal: median ratio <= 1.05).

Usage:
  python benchmarks/router/bench.py --job JOB [--requests 200] [--max-tokens 1] [--json out.json]
  python benchmarks/router/bench.py --submit [--profile scripts/lab/profile.yaml] MODEL
      (submits a 2-replica job on the lab, measures, cancels it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def measure(job: Any, requests: int, max_tokens: int) -> dict[str, Any]:
    import openai

    from slurm_vllm import direct_http

    st = job.status()
    ep = job.endpoint
    if not st.replicas:
        raise SystemExit(f"job {job.job_id} has no replicas: nothing to compare")
    replica = st.replicas[0]["url"]
    clients = {name: openai.OpenAI(base_url=url, api_key=ep.api_key or "EMPTY", max_retries=0, timeout=60,
                                   http_client=direct_http.openai_http_client(openai))
               for name, url in (("router", ep.base_url), ("direct", replica))}
    times: dict[str, list[float]] = {"router": [], "direct": []}
    for name in ("router", "direct"):  # warm both paths (connections, the router's policy state)
        for _ in range(5):
            clients[name].completions.create(model=ep.model, prompt="warm up", max_tokens=max_tokens)
    for i in range(requests):
        order = ("router", "direct") if i % 2 == 0 else ("direct", "router")
        for name in order:
            t0 = time.perf_counter()
            clients[name].completions.create(model=ep.model, prompt=f"Say {i}.", max_tokens=max_tokens)
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"job": job.job_id, "requests": requests, "max_tokens": max_tokens,
                           "replicas": len(st.replicas), "router_url": ep.base_url, "direct_url": replica}
    for name, values in times.items():
        out[name] = {"median_ms": 1000 * statistics.median(values), "p95_ms": 1000 * p95(values)}
    out["ratio_median"] = out["router"]["median_ms"] / out["direct"]["median_ms"]
    out["ratio_p95"] = out["router"]["p95_ms"] / out["direct"]["p95_ms"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", help="a READY job with replicas (id or directory)")
    ap.add_argument("--submit", metavar="MODEL", help="submit a 2-replica job of MODEL first (lab)")
    ap.add_argument("--profile", default=str(REPO / "scripts" / "lab" / "profile.yaml"))
    ap.add_argument("--policy", default=None, help="with --submit: the router's policy (default: its own)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import slurm_vllm

    submitted = None
    if args.submit:
        argv = [sys.executable, "-m", "slurm_vllm", "submit", "--profile", args.profile, args.submit, "--nodes", "2",
                "--replicas", "2", "--gpus-per-node", "1", "--mem", "5000M", "--json",
                *(["--router-policy", args.policy] if args.policy else []), "--",
                "--max-model-len", "256", "--dtype", "float32", "--enforce-eager"]
        submitted = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)["job_id"]
        args.job = submitted
    if not args.job:
        ap.error("give --job JOB or --submit MODEL")
    job = slurm_vllm.attach(args.job)
    try:
        job.wait_ready(timeout=900)
        result = measure(job, args.requests, args.max_tokens)
    finally:
        if submitted:
            job.cancel()
    for name in ("router", "direct"):
        print(f"{name:>6}: median {result[name]['median_ms']:7.2f} ms   p95 {result[name]['p95_ms']:7.2f} ms")
    print(f"router/direct: median {result['ratio_median']:.3f}   p95 {result['ratio_p95']:.3f}"
          "   (goal: median <= 1.05)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
