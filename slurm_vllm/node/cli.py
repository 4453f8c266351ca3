"""Argument parsing for the compute-node entries: ``node``, ``leader``, ``worker``.

The package CLI dispatches ``python -m slurm_vllm node|leader|worker ...`` here; this module
also runs on its own (``python -m slurm_vllm.node.cli node --job-dir DIR``). Nothing heavy is
imported until a command actually runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from slurm_vllm.node.seed import DEFAULT_PORT, DEFAULT_TIMEOUT, SeedArgs


def node_main(argv: Sequence[str]) -> int:
    """``node --job-dir DIR``: this node's part of a job (launched by srun, one task per node)."""
    p = argparse.ArgumentParser(prog="slurm_vllm node", description=(
        "Run this node's part of a slurm_vllm job: rank 0 starts the Ray head and serves, the "
        "other ranks join it. Launched by the job script through srun, one task per node."))
    p.add_argument("--job-dir", required=True, help="the job directory (holds spec.json and the secrets)")
    args = p.parse_args(list(argv))
    from slurm_vllm.node.program import run_node

    return run_node(args.job_dir)


def _number(value: str, flag: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"error: {flag} expects a number, got {value!r}") from None


def parse_seed_args(argv: Sequence[str], known: dict[str, tuple[str, type]]) -> SeedArgs:
    """Pick the seed's own flags out of ``argv``; keep everything else for ``ray start``.

    Accepts ``--ray_port=6379``, ``--ray-port=6379`` and ``--ray-port 6379``. Unknown flags are
    passed through in order, exactly as given.
    """
    out = SeedArgs()
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        key = name.replace("-", "_").lstrip("_") if name.startswith("--") else None
        if key in known:
            attr, kind = known[key]
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: {name} expects a value")
                value = argv[i + 1]
                i += 1
            setattr(out, attr, value if kind is str else _number(value, name, kind))
        else:
            out.extra.append(arg)
        i += 1
    return out


LEADER_FLAGS: dict[str, tuple[str, type]] = {
    "ray_port": ("ray_port", int),
    "ray_cluster_size": ("ray_cluster_size", int),
    "ray_init_timeout": ("ray_init_timeout", float),
}
WORKER_FLAGS: dict[str, tuple[str, type]] = {
    "ray_address": ("ray_address", str),
    "ray_port": ("ray_port", int),
    "ray_init_timeout": ("ray_init_timeout", float),
}

LEADER_HELP = f"""usage: slurm_vllm leader --ray_cluster_size=N [--ray_port=P] [--ray_init_timeout=S] [RAY_ARGS...]

Start a Ray head and exit 0 once N nodes are alive (the head keeps running for the
`vllm serve` that follows), or 1 when the timeout (default {DEFAULT_TIMEOUT:.0f} s) passes.
--ray_port defaults to {DEFAULT_PORT}. Other arguments go to `ray start` unchanged.
Drop-in for vLLM's multi-node-serving.sh leader; dashes also accepted (--ray-port).
"""

WORKER_HELP = f"""usage: slurm_vllm worker --ray_address=HEAD [--ray_port=P] [--ray_init_timeout=S] [RAY_ARGS...]

Join the Ray head at HEAD:P (default port {DEFAULT_PORT}), retrying with backoff until the
timeout (default {DEFAULT_TIMEOUT:.0f} s), then stay attached. Exits 1 when the head never
answered in time or went away. Other arguments go to `ray start` unchanged.
Drop-in for vLLM's multi-node-serving.sh worker; dashes also accepted (--ray-address).
"""


def leader_main(argv: Sequence[str]) -> int:
    """``leader``: the seed's leader subcommand (exit 0 once N nodes alive, 1 on timeout)."""
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(LEADER_HELP)
        return 0
    from slurm_vllm.node.seed import run_leader

    return run_leader(parse_seed_args(argv, LEADER_FLAGS))


def worker_main(argv: Sequence[str]) -> int:
    """``worker``: the seed's worker subcommand (stay attached; exit 1 after the timeout)."""
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(WORKER_HELP)
        return 0
    from slurm_vllm.node.seed import run_worker

    return run_worker(parse_seed_args(argv, WORKER_FLAGS))


ENTRIES = {"node": node_main, "leader": leader_main, "worker": worker_main}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ENTRIES:
        sys.stderr.write("usage: python -m slurm_vllm.node.cli {node,leader,worker} ...\n")
        return 2
    return ENTRIES[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
