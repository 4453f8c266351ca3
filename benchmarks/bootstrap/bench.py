"""Time from the srun step starting to N Ray nodes alive, on a real Slurm cluster (or the lab).

Three ways to form the same cluster, each in its own exclusive N-node job, interleaved per
repetition so a busy machine affects them alike:

* ``slurm_vllm``: the job script ``prepare_job`` renders, node program with serving switched
  off (SLURM_VLLM_NODE_NO_SERVE=1); "ready" is when the head writes LOADING_MODEL with N/N nodes.
* ``seed``: the seed recipe's loop (seed_like.sh: leader polls with a fresh ray.init() every
  5 s, workers retry ``ray start`` every 5 s); "ready" is when the leader exits 0.
* ``symmetric-run``: ``ray symmetric-run --min-nodes N``; "ready" is when its entrypoint runs.

"Start" is the earliest moment any task of the step began (each task stamps the clock first).
Usage: python benchmarks/bootstrap/bench.py [--nodes 2 3] [--reps 3] [--partition debug]
       [--venv PATH] [--json results.json]
"""

from __future__ import annotations

import argparse
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
VARIANTS = ("slurm_vllm", "dropin", "seed", "symmetric-run", "floor")
STAMP = 'date +%s.%N > "$BENCH_OUT/start-$SLURM_NODEID"'

OTHER_SCRIPT = """#!/bin/bash
#SBATCH --job-name=bench-{variant}
#SBATCH --nodes={n}
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=00:05:00
#SBATCH --partition={partition}
#SBATCH --output={out}/batch-%j.out
set -u
source {venv}/bin/activate
export RAY_USAGE_STATS_ENABLED=0 BENCH_OUT={out}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export HEAD
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output={out}/task-%t.log bash -c '{stamp}
{body}'
"""

SEED_BODY = """if [ "$SLURM_NODEID" = 0 ]; then
  {seed} leader 6379 {n} 120 && date +%s.%N > "$BENCH_OUT/ready" && exec sleep 600
else
  exec {seed} worker "$HEAD" 6379 120
fi"""

DROPIN_BODY = """if [ "$SLURM_NODEID" = 0 ]; then
  python3 -m slurm_vllm leader --ray_port=6379 --ray_cluster_size={n} --ray_init_timeout=120 \
    && date +%s.%N > "$BENCH_OUT/ready" && exec sleep 600
else
  exec python3 -m slurm_vllm worker --ray_address="$HEAD" --ray_port=6379 --ray_init_timeout=120
fi"""

# The floor: Ray's own start-up and nothing else. A bare head; every worker's bare `ray start`
# launched the moment the GCS port answers (a 50 ms TCP probe); the head counts alive nodes with
# one GCS client every 100 ms.
FLOOR_BODY = """if [ "$SLURM_NODEID" = 0 ]; then
  ray start --head --port=6379 --include-dashboard=false --block >/dev/null &
  python3 {here}/floor_head.py {n} && exec sleep 600
else
  until (exec 3<>"/dev/tcp/$HEAD/6379") 2>/dev/null; do sleep 0.05; done
  exec ray start --address="$HEAD:6379" --block >/dev/null
fi"""

SYMMETRIC_BODY = """exec ray symmetric-run --address "$HEAD:6379" --min-nodes {n} -- \\
  bash -c "date +%s.%N > $BENCH_OUT/ready; exec sleep 600\""""


def run(argv: list[str], timeout: float = 60) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def squeue_state(job: str) -> str | None:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                          timeout=30, check=False).stdout.strip() or None


def prepare_slurm_vllm(out: Path, n: int, partition: str, venv: str) -> Path:
    """Our job script, with a one-line wrapper that stamps the step start on each node."""
    sys.path.insert(0, str(HERE.parents[1]))
    from slurm_vllm.render import prepare_job
    from slurm_vllm.spec import ServeSpec

    jd = prepare_job(ServeSpec(
        "org/bootstrap-benchmark", nodes=n, gpus_per_node=1, partition=partition, time="00:05:00",
        exclusive=True, job_name="bench-slurm_vllm", venv=venv, job_dir=str(out / "job"),
        env={"SLURM_VLLM_NODE_NO_SERVE": "1", "BENCH_OUT": str(out)},
        # Forming the cluster only: the pre-flight's all-reduce (a torch import per node) is its own cost.
        ray={"join_timeout": 120, "cluster_timeout": 120, "preflight": "quick"}))
    return stamped_script(jd, out)


def stamped_script(jd: Any, out: Path) -> Path:
    """``jd``'s job script with a one-line wrapper that stamps the step start on each node."""
    wrapper = out / "stamp.sh"
    wrapper.write_text(f"#!/bin/bash\nBENCH_OUT={shlex.quote(str(out))}\n{STAMP}\nexec \"$@\"\n")
    wrapper.chmod(0o755)
    marker = "python3 -m slurm_vllm node"
    script = out / "bench.sbatch"
    script.write_text(jd.script.read_text().replace(marker, f"{wrapper} {marker}", 1))
    return script


def prepare_other(variant: str, out: Path, n: int, partition: str, venv: str) -> Path:
    body = {"seed": SEED_BODY.format(seed=HERE / "seed_like.sh", n=n), "symmetric-run": SYMMETRIC_BODY.format(n=n),
            "dropin": DROPIN_BODY.format(n=n), "floor": FLOOR_BODY.format(here=HERE, n=n)}[variant]
    script = out / "bench.sbatch"
    script.write_text(OTHER_SCRIPT.format(variant=variant, n=n, partition=partition, out=out, venv=venv,
                                          stamp=STAMP, body=body))
    return script


def ready_time(variant: str, out: Path) -> float | None:
    if variant == "slurm_vllm":
        try:
            state = json.loads((out / "job" / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if state.get("phase") == "FAILED":
            raise RuntimeError(f"slurm_vllm run failed: {state.get('reason')}")
        return state.get("phase_times", {}).get("LOADING_MODEL")
    try:
        return float((out / "ready").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def one_run(variant: str, n: int, partition: str, venv: str, root: Path, timeout: float = 180) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-{n}-", dir=root))
    out.chmod(0o755)
    script = (prepare_slurm_vllm if variant == "slurm_vllm" else
              lambda o, n_, p, v: prepare_other(variant, o, n_, p, v))(out, n, partition, venv)
    job = run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
    try:
        t0 = time.monotonic()
        while squeue_state(job) == "PENDING" and time.monotonic() - t0 < 1800:
            time.sleep(0.5)  # other jobs may hold the nodes; the timeout starts when this one runs
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            ready = ready_time(variant, out)
            if ready is not None:
                starts = [float(p.read_text().strip()) for p in out.glob("start-*")]
                if len(starts) < n:
                    raise RuntimeError(f"{variant}: only {len(starts)}/{n} tasks stamped a start")
                return ready - min(starts)
            if squeue_state(job) is None and time.monotonic() - t0 > 5:
                raise RuntimeError(f"{variant} job {job} ended before the cluster was ready (see {out})")
            time.sleep(0.2)
        raise RuntimeError(f"{variant} job {job}: not ready after {timeout}s (see {out})")
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30, check=False)
        t1 = time.monotonic()
        while squeue_state(job) is not None and time.monotonic() - t1 < 90:
            time.sleep(0.3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 3])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--partition", default=os.environ.get("SLURM_VLLM_LAB_PARTITION", "debug"))
    p.add_argument("--venv", default=os.environ.get("SLURM_VLLM_LAB_VENV", str(Path(sys.executable).parent.parent)))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--workdir", default=None, help="shared directory for job files (default: a new temp dir)")
    p.add_argument("--json", default=None, help="write all measurements to this file")
    args = p.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bootstrap-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, list[float]]] = {v: {n: [] for n in args.nodes} for v in args.variants}
    for rep in range(args.reps):
        for n in args.nodes:
            for variant in args.variants:
                try:
                    secs = one_run(variant, n, args.partition, args.venv, root)
                except RuntimeError as e:
                    print(f"rep {rep + 1} N={n} {variant}: ERROR {e}", flush=True)
                    continue
                results[variant][n].append(secs)
                print(f"rep {rep + 1} N={n} {variant:14s} {secs:6.2f} s", flush=True)
    print("\nmedian seconds from step start to N nodes alive")
    print(f"{'N':>2}  " + "  ".join(f"{v:>14s}" for v in args.variants))
    summary: dict[int, dict[str, object]] = {}
    for n in args.nodes:
        med = {v: statistics.median(results[v][n]) if results[v][n] else float("nan") for v in args.variants}
        print(f"{n:>2}  " + "  ".join(f"{med[v]:14.2f}" for v in args.variants))
        ratios = {f"{ours}/{base}": med[ours] / med[base] for ours in ("slurm_vllm", "dropin") if ours in med
                  for base in ("floor", "seed", "symmetric-run") if base in med}
        summary[n] = {"median": med, "ratios": ratios}
        print("    " + "   ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print("goals: ours/floor <= 1.2, ours/seed <= 0.4, ours/symmetric-run <= 0.4 (node program and drop-in)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
