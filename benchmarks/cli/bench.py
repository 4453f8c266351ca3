"""CLI start-up: ``slurm-vllm --help`` (and friends) against ``vec-inf --help``, in one run.

Every command is a fresh process, as on a login node where each keystroke's command starts
Python anew. The commands are interleaved within each round (and the order rotates), so a
change of load on the machine hits them alike; each is run once first, uncounted, to warm the
filesystem cache. Prints the median, min and max per command and the ratio of each of ours to
``vec-inf --help`` (goal: at most 0.5).

    python benchmarks/cli/bench.py [--runs 21] [--vec-inf PATH] [--json out.json]

This checkout's package is measured (``PYTHONPATH`` points at it), whatever is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOAL = 0.5
VEC_INF = "vec-inf --help"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _console_script(name: str) -> str | None:
    """The console script next to this interpreter (the venv's), else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def commands(vec_inf: str | None) -> tuple[dict[str, list[str]], list[str]]:
    """The commands to time, by label, and notes about those that cannot be run."""
    py = sys.executable
    cmds = {"python -c pass (floor)": [py, "-c", "pass"]}
    notes = []
    script = _console_script("slurm-vllm")
    if script:
        cmds["slurm-vllm --help"] = [script, "--help"]
        cmds["slurm-vllm submit --help"] = [script, "submit", "--help"]
    else:
        notes.append("slurm-vllm console script not found (pip install the checkout): timing python -m only")
        cmds["python -m slurm_vllm submit --help"] = [py, "-m", "slurm_vllm", "submit", "--help"]
    cmds["python -m slurm_vllm --help"] = [py, "-m", "slurm_vllm", "--help"]
    vec = vec_inf or shutil.which("vec-inf")
    if vec and Path(vec).exists():
        cmds[VEC_INF] = [vec, "--help"]
    else:
        notes.append("vec-inf not found: install it in a throwaway venv (python3 -m venv VENV && "
                     "VENV/bin/pip install vec-inf) and pass --vec-inf VENV/bin/vec-inf; measuring ours only")
    return cmds, notes


def time_once(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from start to exit of one process; a failing command stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def measure(cmds: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    env = _env()
    for argv in cmds.values():
        time_once(argv, env)  # warm-up, not counted
    times: dict[str, list[float]] = {label: [] for label in cmds}
    labels = list(cmds)
    for i in range(runs):
        k = i % len(labels)
        for label in labels[k:] + labels[:k]:
            times[label].append(time_once(cmds[label], env))
    return times


def report(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    rows = {label: {"median_ms": statistics.median(t) * 1000, "min_ms": min(t) * 1000, "max_ms": max(t) * 1000}
            for label, t in times.items()}
    base = rows.get(VEC_INF, {}).get("median_ms")
    for label, row in rows.items():
        if base and label != VEC_INF and not label.startswith("python -c"):
            row["ratio_to_vec_inf"] = row["median_ms"] / base
    width = max(len(label) for label in rows)
    print(f"{'command':<{width}}  median    min      max      vs vec-inf")
    for label, row in rows.items():
        ratio = row.get("ratio_to_vec_inf")
        verdict = "" if ratio is None else f"{ratio:.2f}x ({'ok' if ratio <= GOAL else 'over'} goal {GOAL}x)"
        figures = " ".join(f"{row[k]:6.0f} ms" for k in ("median_ms", "min_ms", "max_ms"))
        print(f"{label:<{width}}  {figures}  {verdict}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=21, help="timed runs per command (median of these)")
    ap.add_argument("--vec-inf", default=None, metavar="PATH", help="the vec-inf executable (default: on PATH)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    cmds, notes = commands(args.vec_inf)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    which = subprocess.run([sys.executable, "-c", "import slurm_vllm; print(slurm_vllm.__file__)"], env=_env(),
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.runs} runs each; slurm_vllm from {which}")
    rows = report(measure(cmds, args.runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "notes": notes, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
