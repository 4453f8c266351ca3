"""The per-job port plan: derived from the job id, skipping taken ports, never Ray's defaults."""

from __future__ import annotations

import socket

import pytest

from slurm_vllm.errors import NodeError
from slurm_vllm.node import ports
from slurm_vllm.node.ports import NAMED, PortPlan, plan_ports


def all_ports(p: PortPlan) -> list[int]:
    return [getattr(p, n) for n in NAMED] + list(range(p.min_worker, p.max_worker + 1))


def test_plan_is_deterministic_distinct_and_in_region():
    a = plan_ports("1234", is_free=lambda p: True)
    assert a == plan_ports("1234", is_free=lambda p: True)
    used = all_ports(a)
    assert len(used) == len(set(used))
    assert all(ports.REGION_START <= p < ports.REGION_END for p in used)
    assert 6379 not in used and 8265 not in used and 10001 not in used


def test_consecutive_jobs_and_ranks_do_not_overlap():
    plans = [plan_ports(str(j), r, is_free=lambda p: True) for j in range(1000, 1004) for r in range(3)]
    sets = [set(all_ports(p)) for p in plans]
    for i in range(len(sets)):
        for k in range(i + 1, len(sets)):
            assert not sets[i] & sets[k], (plans[i], plans[k])


def test_taken_named_port_is_skipped():
    free = plan_ports("42", is_free=lambda p: True)
    taken = {free.gcs, free.node_manager}
    p = plan_ports("42", is_free=lambda port: port not in taken)
    assert p.gcs not in taken and p.node_manager not in taken
    assert set(all_ports(p)).isdisjoint(taken)


def test_taken_worker_port_moves_to_next_slot():
    free = plan_ports("42", is_free=lambda p: True)
    p = plan_ports("42", is_free=lambda port: port != free.min_worker + 3)
    assert p.min_worker != free.min_worker
    assert not (p.min_worker <= free.min_worker + 3 <= p.max_worker)


def test_really_bound_port_is_skipped():
    first = plan_ports("99")
    with socket.socket() as s:
        s.bind(("", first.gcs))
        s.listen()
        second = plan_ports("99")
    assert second.gcs != first.gcs


def test_fixed_ports_are_kept_or_refused():
    p = plan_ports("5", api_port=8080, gcs_port=6379, is_free=lambda x: True)
    assert (p.api, p.gcs) == (8080, 6379)
    assert 8080 not in range(p.min_worker, p.max_worker + 1)
    with pytest.raises(NodeError, match="port 8080 .*already in use"):
        plan_ports("5", api_port=8080, is_free=lambda x: x != 8080)


def test_no_free_block_is_an_error():
    with pytest.raises(NodeError, match="no free block"):
        plan_ports("5", is_free=lambda x: False)


def test_ray_start_args_head_and_worker():
    p = plan_ports("7", is_free=lambda x: True)
    head = p.ray_start_args(head=True)
    assert f"--port={p.gcs}" in head and "--include-dashboard=false" in head
    assert f"--ray-client-server-port={p.ray_client_server}" in head
    assert f"--dashboard-port={p.dashboard}" in head
    worker = p.ray_start_args(head=False)
    assert not any(a.startswith("--port=") for a in worker)
    assert f"--min-worker-port={p.min_worker}" in worker and f"--max-worker-port={p.max_worker}" in worker


def test_non_numeric_job_id_still_plans():
    assert plan_ports("nojob", is_free=lambda x: True).gcs >= ports.REGION_START


# --- co-resident jobs: disjoint by construction, tested again right before binding -----------


def test_jobs_whose_ids_differ_by_the_stride_get_disjoint_plans_when_slots_are_claimed():
    """Without claims both plans are the same slot: nothing is bound when the second job plans
    (Ray binds its worker ports minutes later)."""
    a_id, b_id = "5000", str(5000 + ports.SLOTS)
    assert plan_ports(a_id, is_free=lambda p: True) == plan_ports(b_id, is_free=lambda p: True)
    held: set[int] = set()

    def claim(slot: int) -> bool:
        if slot in held:
            return False
        held.add(slot)
        return True

    a = plan_ports(a_id, is_free=lambda p: True, claim=claim)
    b = plan_ports(b_id, is_free=lambda p: True, claim=claim)
    assert set(all_ports(a)).isdisjoint(all_ports(b))


def test_a_real_claim_keeps_a_second_process_out_of_the_slot(tmp_path):
    import subprocess
    import sys

    slot = ports.job_slot("777")
    assert ports.claim_slot(slot)
    try:
        assert ports.claim_slot(slot)  # this process holds it already
        code = (f"import sys; from slurm_vllm.node import ports; "
                f"sys.exit(0 if ports.claim_slot({slot}) else 3)")
        other = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": ":".join(sys.path)})
        assert other.returncode == 3, "another process could claim a held slot"
    finally:
        ports.release_slot(slot)
    # Released (or its holder died): claimable again.
    other = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": ":".join(sys.path)})
    assert other.returncode == 0


def test_taken_names_the_ports_something_holds_now():
    plan = plan_ports("31", is_free=lambda p: True)
    assert plan.taken(is_free=lambda p: True) == []
    assert plan.taken(is_free=lambda p: p != plan.node_manager) == [plan.node_manager]
    with socket.socket() as s:
        s.bind(("", plan.gcs))
        s.listen()
        assert plan.gcs in plan.taken()
