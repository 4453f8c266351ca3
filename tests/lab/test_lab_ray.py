"""Real Ray across the lab's nodes, started the plain way (``ray start``) inside one Slurm job.

This checks the lab, not the library's bootstrap (tests/lab/test_bootstrap.py does that): every
node has its own IP and /tmp/ray, so three raylets form one cluster as on real hardware.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

NODE_SH = r"""#!/bin/bash
# One task per node: rank 0 runs the Ray head, the others join once its port answers.
set -euo pipefail
head_ip=$1 port=$2 ray=$3
ip=$(hostname -I | cut -d' ' -f1)
common=(--block --node-ip-address="$ip" --num-cpus=1 --disable-usage-stats
        --temp-dir="/tmp/ray/lab-test-$SLURM_JOB_ID")
if [[ $SLURM_NODEID == 0 ]]; then
    exec "$ray" start --head --port="$port" --ray-client-server-port=$((port + 1)) \
        --include-dashboard=false "${common[@]}"
fi
for ((i = 0; i < 600; i++)); do
    (exec 3<>"/dev/tcp/$head_ip/$port") 2>/dev/null && break
    sleep 0.1
done
exec "$ray" start --address="$head_ip:$port" "${common[@]}"
"""

DRIVER_PY = r"""
import json, sys, time
import ray

address, want, t0 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR")
deadline = time.time() + 90
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.time() > deadline:
        break
    time.sleep(0.2)
print(json.dumps({"ips": sorted(n["NodeManagerAddress"] for n in alive),
                  "formed_s": round(time.time() - t0, 1)}))
"""

BATCH = """#!/bin/bash
#SBATCH --nodes=3 --ntasks-per-node=1 --time=5 --output=batch.out
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0
port=$((20000 + SLURM_JOB_ID % 5000 * 2))
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
head_ip=$(getent hosts "$head" | cut -d' ' -f1)
t0=$(date +%s.%N)
# Explicit step memory: with CR_Core_Memory a step without --mem takes all of the job's memory
# on its nodes, and the overlapping driver step would be refused.
srun --ntasks-per-node=1 --mem=600M bash node.sh "$head_ip" "$port" {ray} &
srun --overlap --nodes=1 --ntasks=1 --mem=300M -w "$head" timeout 150 \\
    {python} driver.py "$head_ip:$port" "$SLURM_JOB_NUM_NODES" "$t0" > result.json
"""


def test_ray_cluster_spans_three_nodes_with_distinct_ips(lab: Lab, tmp_path: Path) -> None:
    """Head on rank 0, two workers join; ray.nodes() shows 3 alive nodes on the 3 node IPs."""
    (tmp_path / "node.sh").write_text(NODE_SH)
    (tmp_path / "driver.py").write_text(DRIVER_PY)
    batch = BATCH.format(ray=lab.venv / "bin" / "ray", python=lab.python)
    job = lab.sbatch(batch, tmp_path)
    result = lab.wait_job(job, timeout=240)
    log = (tmp_path / "batch.out").read_text() if (tmp_path / "batch.out").exists() else ""
    assert result.state == "COMPLETED", (result, log[-3000:])
    report = json.loads((tmp_path / "result.json").read_text())
    print(f"Ray cluster of 3 nodes formed {report['formed_s']} s after the batch script started")
    assert len(set(report["ips"])) == 3 and set(report["ips"]) <= set(lab.node_ips), report  # 3 of the lab's nodes
    # The Ray step outlived the driver; the job's end must have taken every raylet with it.
    lab.assert_no_job_processes(job)
