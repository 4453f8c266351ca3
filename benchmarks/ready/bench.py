"""Submit to READY on the lab, per phase, against a floor measured in the same run.

The job: the tiny model over 2 nodes, PP=2 over Ray, the lab profile (what the lab tests serve).
Each variant is its own Slurm job, one at a time (one vLLM on the lab's 2 cores at a time):

* ``floor-ray``: the bootstrap benchmark's floor, a bare ``ray start --head`` and bare worker
  ``ray start`` on 2 nodes, to 2 nodes alive (benchmarks/bootstrap).
* ``floor-vllm``: a bare ``vllm serve`` of the same model on one node, same arguments and
  environment (the warm compile caches included), to its first ``/health`` 200.
* ``cold``: our job with an empty ``cache_dir``; ``warm``: the same job again, finding the
  caches the cold run filled; ``staged``: warm, with ``stage_weights: shm``.

Every time runs from the step's start (each task stamps the clock first, as in the bootstrap
benchmark) to READY, read from the job's ``state.json``; the phases come from its timeline. It
prints ours(warm) / (floor-ray + floor-vllm) (goal <= 1.10), warm / cold (goal <= 0.7) and
staged / warm. Usage (lab up, from the repository root, with the lab venv's Python):

    python benchmarks/ready/bench.py [--reps 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))


def _load_bootstrap() -> Any:
    """benchmarks/bootstrap/bench.py (the Ray floor and the job helpers), loaded by its path."""
    spec = importlib.util.spec_from_file_location("bootstrap_bench", REPO / "benchmarks" / "bootstrap" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstrap = _load_bootstrap()

VARIANTS = ("floor-ray", "floor-vllm", "cold", "warm", "staged")
PORT = 28411
BARE_SCRIPT = """#!/bin/bash
#SBATCH --job-name=bench-bare-vllm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=00:15:00
#SBATCH --partition={partition}
#SBATCH --output={out}/batch-%j.out
set -u
source {venv}/bin/activate
export BENCH_OUT={out} {exports}
srun --ntasks=1 --output={out}/task-%t.log bash -c '{stamp}
vllm serve {model} --port {port} {args} > "$BENCH_OUT/vllm.log" 2>&1 &
until curl -sf -o /dev/null http://127.0.0.1:{port}/health; do sleep 0.2; done
date +%s.%N > "$BENCH_OUT/ready"
exec sleep 600'
"""


@functools.cache
def the_lab() -> Any:
    from tests.lab.lab import open_lab

    return open_lab()


def lab_spec(job_dir: Path, cache_dir: str, **flags: Any) -> Any:
    from tests.lab.test_serving import lab_spec as spec_for

    lab = the_lab()
    os.environ["SLURM_VLLM_LAB_CACHE"] = cache_dir  # what the lab's spec reads; the flag below wins anyway
    return lab, spec_for(lab, job_dir, pipeline_parallel_size=2, tensor_parallel_size=1, cache_dir=cache_dir,
                         exclusive=True, **flags)


def wait_file(job: str, path: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while bootstrap.squeue_state(job) == "PENDING":
        time.sleep(0.5)
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"job {job}: no {path.name} after {timeout:.0f} s")
        if bootstrap.squeue_state(job) is None:
            raise RuntimeError(f"job {job} ended before {path.name} (see {path.parent})")
        time.sleep(0.3)


def end(job: str) -> None:
    subprocess.run(["scancel", job], capture_output=True, timeout=30, check=False)
    t0 = time.monotonic()
    while bootstrap.squeue_state(job) is not None and time.monotonic() - t0 < 120:
        time.sleep(0.5)


def starts(out: Path) -> float:
    return min(float(p.read_text()) for p in out.glob("start-*"))


def ours(out: Path, cache_dir: str, **flags: Any) -> tuple[float, dict[str, float]]:
    """Our job from the step's start to READY; and its phases (the timeline's durations)."""
    from slurm_vllm import timeline
    from slurm_vllm.jobdir import StateRecord
    from slurm_vllm.render import prepare_job

    _, spec = lab_spec(out / "job", cache_dir, **flags)
    jd = prepare_job(spec)
    script = bootstrap.stamped_script(jd, out)
    job = bootstrap.run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
    try:
        t0 = time.monotonic()
        while True:
            try:
                state = StateRecord.model_validate(json.loads(jd.state.read_text()))
            except (FileNotFoundError, ValueError):
                state = None
            if state is not None and state.phase.value == "FAILED":
                raise RuntimeError(f"our job failed: {state.reason}")
            if state is not None and state.phase.value == "READY":
                break
            if time.monotonic() - t0 > 900:
                raise RuntimeError(f"our job {job}: not READY after 900 s")
            time.sleep(0.5)
        ready = state.phase_times["READY"]
        return ready - starts(out), timeline.durations(timeline.build(state))
    finally:
        end(job)


def floor_vllm(out: Path, cache_dir: str) -> float:
    """A bare ``vllm serve`` on one node, the same arguments and environment, to /health."""
    from slurm_vllm.node import warm

    lab, spec = lab_spec(out / "unused", cache_dir)
    env = dict(spec.environment.env)
    env.pop("SLURM_VLLM_LAB_CPU_RAY", None)  # the lab's Ray shim: no Ray here
    env.pop("RAY_OVERRIDE_RESOURCES", None)
    env.update(warm.cache_vars(cache_dir, {"PATH": f"{lab.venv}/bin"}, lambda _line: None))
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    script = out / "bench.sbatch"
    script.write_text(BARE_SCRIPT.format(partition=lab.partition, out=out, venv=lab.venv, exports=exports,
                                         stamp=bootstrap.STAMP, model=shlex.quote(str(lab.model)), port=PORT,
                                         args=" ".join(map(shlex.quote, spec.model.extra_args))))
    job = bootstrap.run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
    try:
        wait_file(job, out / "ready", 900)
        return float((out / "ready").read_text()) - starts(out)
    finally:
        end(job)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--json", default=None, help="write all measurements to this file")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ready-bench-"))
    root.chmod(0o755)
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    phases: dict[str, list[dict[str, float]]] = {v: [] for v in ("cold", "warm", "staged")}
    for rep in range(args.reps):
        cache = root / f"cache-{rep}"  # empty: the cold run fills it, the others find it
        cache.mkdir()
        cache.chmod(0o700)
        for variant in ("floor-ray", "cold", "warm", "staged", "floor-vllm"):
            out = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=root))
            out.chmod(0o755)
            try:
                if variant == "floor-ray":
                    secs = bootstrap.one_run("floor", 2, the_lab().partition, str(the_lab().venv), root)
                elif variant == "floor-vllm":
                    secs = floor_vllm(out, str(cache))
                else:
                    secs, spans = ours(out, str(cache), **({"stage_weights": "shm"} if variant == "staged" else {}))
                    phases[variant].append(spans)
            except RuntimeError as e:
                print(f"rep {rep + 1} {variant}: ERROR {e}", flush=True)
                continue
            runs[variant].append(secs)
            extra = f"  {phases[variant][-1]}" if variant in phases else ""
            print(f"rep {rep + 1} {variant:10s} {secs:7.1f} s{extra}", flush=True)
    med = {v: statistics.median(xs) if xs else float("nan") for v, xs in runs.items()}
    floor = med["floor-ray"] + med["floor-vllm"]
    ratios = {"warm/floor": med["warm"] / floor, "warm/cold": med["warm"] / med["cold"],
              "staged/warm": med["staged"] / med["warm"]}
    print("\nmedian seconds from step start: " + ", ".join(f"{v} {med[v]:.1f}" for v in VARIANTS))
    print(f"floor (Ray formation + bare vllm serve to /health) {floor:.1f} s")
    print("   ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print("goals: warm/floor <= 1.10, warm/cold <= 0.7")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "phases": phases, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
