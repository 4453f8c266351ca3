"""Pre-flight: what every node checks before anything heavy starts, and how the nodes agree.

A job that cannot work should fail in seconds with a sentence, not after minutes of loading
with a traceback. So every node, once its ports and Ray temp dir are planned and before Ray or
vLLM start, runs the quick checks of node/checks.py (milliseconds) and writes them, with the
fingerprint of the model's ``config.json``, to ``preflight-<rank>.json``. The head waits for
every node's record (``ray.cluster_timeout``), fails the job if a node's record is missing or a
node's model differs from its own, and, when more than one node serves one replica, all nodes
run a short all-reduce through torch.distributed (node/allreduce.py) that proves the network
vLLM will use. The head then writes the results to ``state.json`` (``preflight``) and its
verdict to its own record, which the other nodes wait for: no node starts Ray or vLLM after a
failed pre-flight. ``ray.preflight``: ``full`` (default), ``quick`` (no all-reduce), ``off``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from slurm_vllm import timeline
from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import Mark, Phase, PreflightCheck, PreflightRecord, tail_lines
from slurm_vllm.node import checks, ray_cluster
from slurm_vllm.node.allreduce import IMPORT_TIMEOUT, TIMEOUT, AllReduce, Outcome, torch_importable
from slurm_vllm.node.lifecycle import Stopper
from slurm_vllm.node.ports import PortPlan
from slurm_vllm.node.topology import IfAddr, Topology, ipv4_interfaces, route_source_ip
from slurm_vllm.spec import ServeSpec

if TYPE_CHECKING:
    from slurm_vllm.node.program import NodeProgram

POLL = 0.1  # seconds between reads of the shared filesystem while waiting for a record
PROGRESS_AFTER = 2.0  # the head says whom it waits for once the wait is this long
SHOWN_FAILS = 4  # failing checks a diagnosis names (the rest are in state.json)
BESIDE_RAY_SLACK = 10.0  # seconds the pre-flight's waits outlast Ray's deadlines beside it


NO_TORCH = "skipped: torch is not importable by the node program's Python"


def uses_ray(spec: ServeSpec) -> bool:
    return spec.executor == "ray"


def wants_allreduce(spec: ServeSpec, num_nodes: int) -> bool:
    """The all-reduce runs in ``full`` mode when several nodes serve one replica."""
    return spec.ray.preflight == "full" and spec.nodes_per_replica > 1 and num_nodes > 1


def local_checks(spec: ServeSpec, topo: Topology, ports: PortPlan, env: Mapping[str, str], temp_dir: str, *,
                 addrs: Sequence[IfAddr] | None = None, route_source: Callable[[str], str] = route_source_ip,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 devices: Callable[[], list[str]] | None = None,
                 pid_read: Callable[[], str] | None = None) -> tuple[list[PreflightCheck], str, int]:
    """This node's checks, the model's fingerprint and the GPUs visible (every effect injectable)."""
    host = topo.hostname
    found = [checks.check_address(topo, ipv4_interfaces() if addrs is None else addrs, route_source),
             checks.check_ports(host, ports)]
    workers = checks.workers_per_node(spec.tensor_parallel_size, spec.pipeline_parallel_size, spec.nodes_per_replica)
    found.append(checks.check_shm(host, workers, checks.shm_dir(env), statvfs))
    if uses_ray(spec):
        found.append(checks.check_temp_dir(host, temp_dir, checks.pid_digits(pid_read)))
    gpus, visible = checks.check_gpus(host, spec.resources.gpus_per_node, env, devices)
    model, fingerprint = checks.check_model(host, spec.model.name, spec.is_local_model)
    return [*found, gpus, model], fingerprint, visible


#: What a node checks on itself (:func:`local_checks`; tests give their own).
Checker = Callable[[ServeSpec, Topology, PortPlan, Mapping[str, str], str], tuple[list[PreflightCheck], str, int]]


def compare(records: Mapping[int, PreflightRecord], hosts: Sequence[str], waited: float,
            last_words: Callable[[int], str] = lambda rank: "") -> list[PreflightCheck]:
    """The head's checks across nodes: every node wrote a record, and every node's model
    fingerprint is the head's (rank 0's). A node whose own model check failed is not blamed twice."""
    out: list[PreflightCheck] = []
    for rank, host in enumerate(hosts):
        if rank not in records:
            said = last_words(rank)
            out.append(PreflightCheck(node=host, check="record", status="fail", detail=(
                f"no pre-flight record within {waited:.0f} s; "
                + (f"its last log line: {said!r}" if said else "no log yet (its node program never started?)"))))
    head = records.get(0)
    if head is None or not head.model_fingerprint:
        return out
    for rank, rec in sorted(records.items()):
        if rank == 0 or rec.model_fingerprint == head.model_fingerprint:
            continue
        if any(c.check == "model" and c.status == "fail" for c in rec.checks):
            continue
        theirs = f"sha256 {rec.model_fingerprint[:12]}" if rec.model_fingerprint else "none"
        out.append(PreflightCheck(node=rec.host, check="model_same", status="fail", detail=(
            f"the model's config.json differs from the head's ({theirs} here, sha256 "
            f"{head.model_fingerprint[:12]} on {head.host}): every node must read the same model")))
    return out


def failures(found: Sequence[PreflightCheck]) -> list[PreflightCheck]:
    return [c for c in found if c.status == "fail"]


def diagnosis(found: Sequence[PreflightCheck]) -> str:
    """The job's FAILED reason: ``preflight: labnode2: GPUs visible 1, asked 2`` (several joined by ``; ``)."""
    fails = failures(found)
    parts = [f"{c.node}: {c.detail}" for c in fails[:SHOWN_FAILS]]
    more = len(fails) - SHOWN_FAILS
    return "preflight: " + "; ".join(parts) + (f"; and {more} more (status --json)" if more > 0 else "")


def allreduce_check(host: str, outcome: Outcome) -> PreflightCheck:
    return PreflightCheck(node=host, check="allreduce", status="ok" if outcome.ok else "fail", detail=outcome.detail)


class Preflight:
    """One node's pre-flight, on the node program ``p`` (its job directory, stopper, processes).

    :meth:`check` (this node's checks and record, milliseconds) then :meth:`decide` (the exchange,
    the all-reduce, the verdict). With ``beside_ray`` the decision runs while Ray forms (see
    :func:`begin`): its state writes then keep the phase the head's main flow sets.
    """

    def __init__(self, program: NodeProgram, spec: ServeSpec, topo: Topology, ports: PortPlan,
                 checker: Checker | None = None, beside_ray: bool = False) -> None:
        self.p, self.spec, self.topo, self.ports = program, spec, topo, ports
        self.checker = checker or local_checks
        self.beside_ray = beside_ray
        self.run_id = program.current_run()
        self.t0 = time.monotonic()
        self.hosts = list(topo.hosts[: topo.num_nodes])
        self.allreduce: AllReduce | None = None
        self.own: PreflightRecord | None = None
        #: Beside Ray, Ray's own deadlines name a node (or head) that never came, with what it
        #: last logged; the pre-flight's waits end a little later, so there is one diagnosis.
        self.slack = BESIDE_RAY_SLACK if beside_ray else 0.0

    def run(self) -> bool:
        """Check, exchange, decide; False when the node was stopped meanwhile. Raises NodeError
        with the diagnosis when the pre-flight failed."""
        try:
            self.check()
            return self.decide()
        finally:
            self.close()

    def check(self) -> bool:
        """This node's own checks, logged and written to its record; True when none failed."""
        topo, p = self.topo, self.p
        if wants_allreduce(self.spec, topo.num_nodes) and torch_importable():
            # Started first: torch's import (seconds) overlaps the exchange of records.
            env = ray_cluster.ray_env(p.env, node_ip=topo.node_ip, interface=topo.interface, token_path=None)
            self.allreduce = AllReduce.spawn(rank=topo.rank, world=topo.num_nodes, gpus=self._gpus_hint(), env=env,
                                             owned=p.owned)
        found, fingerprint, _ = self.checker(self.spec, topo, self.ports, p.env, str(p.temp_dir))
        if wants_allreduce(self.spec, topo.num_nodes) and self.allreduce is None:
            found.append(PreflightCheck(node=topo.hostname, check="allreduce", status="warn", detail=NO_TORCH))
        for c in found:
            if c.status != "ok":
                p.log(f"preflight {c.status}: {c.check}: {c.detail}")
        self.own = self._record(found, fingerprint,
                                self.ports.preflight if self.allreduce and topo.is_head else None)
        return not failures(found)

    def decide(self) -> bool:
        """The exchange and the verdict (after :meth:`check`); the all-reduce's child ends here."""
        assert self.own is not None, "check() first"
        try:
            return self._head(self.own, self.allreduce) if self.topo.is_head else self._worker(self.own, self.allreduce)
        finally:
            self.close()

    def close(self) -> None:
        if self.allreduce is not None:
            self.allreduce.close()
            self.allreduce = None

    def _state(self, phase: Phase, **fields: Any) -> None:
        """A state write of the pre-flight: beside Ray's formation it keeps the phase the head's
        main flow wrote (a failure is still a failure)."""
        if self.beside_ray and not phase.final:
            self.p.update_state(otherwise=phase, **fields)
        else:
            self.p.write_state(phase, **fields)

    def _gpus_hint(self) -> int:
        return checks.visible_gpus(self.p.env)[0] if self.spec.resources.gpus_per_node > 0 else 0

    def _record(self, found: list[PreflightCheck], fingerprint: str, rendezvous_port: int | None) -> PreflightRecord:
        rec = PreflightRecord(job_id=self.run_id.job_id, restart=self.run_id.restart or 0, rank=self.topo.rank,
                              host=self.topo.hostname, ip=self.topo.node_ip, interface=self.topo.interface,
                              checks=found, model_fingerprint=fingerprint, rendezvous_port=rendezvous_port,
                              written_at=time.time())
        rec.write(self.p.jobdir.preflight(self.topo.rank))
        return rec

    def _rewrite(self, rec: PreflightRecord, **fields: object) -> PreflightRecord:
        new = rec.model_copy(update={**fields, "written_at": time.time()})
        new.write(self.p.jobdir.preflight(self.topo.rank))
        return new

    # ------------------------------------------------------------ the head

    def _head(self, own: PreflightRecord, allreduce: AllReduce | None) -> bool:
        p, topo = self.p, self.topo
        if allreduce is not None:
            allreduce.go(topo.node_ip, self.ports.preflight)
        records = self._collect(own)
        if records is None:
            return False
        waited = time.monotonic() - self.t0
        found = [c for r in sorted(records) for c in records[r].checks]
        found += compare(records, self.hosts, waited, self._last_words)
        skipped = any(c.check == "allreduce" for c in found)  # a node without torch said so
        if allreduce is not None and not failures(found) and not skipped:
            outcome = allreduce.wait(abort=lambda: p.stopper.stopped)
            if p.stopper.stopped:
                return False
            found.append(allreduce_check(topo.hostname, outcome))
            if not outcome.ok:
                found += self._workers_allreduce()
            p.log(f"preflight all-reduce: {outcome.detail} ({outcome.seconds:.1f} s after the address was given)")
        took = time.monotonic() - self.t0
        marks = [Mark(name=timeline.ALLOCATED, at=p.started_at)]
        if failures(found):
            reason = diagnosis(found)
            self._state(Phase.FAILED, reason=reason, preflight=found, reported_by=topo.hostname,
                        head_host=topo.hostname,
                        missing_hosts=[c.node for c in found if c.check == "record" and c.status == "fail"],
                        marks=[*marks, Mark(name=timeline.PREFLIGHT, at=time.time(), ok=False,
                                            detail=reason.removeprefix("preflight: "))])
            self._rewrite(own, verdict="failed", reason=reason)
            raise NodeError(reason)
        done = [*marks, Mark(name=timeline.PREFLIGHT, at=time.time(), detail=f"{topo.num_nodes} node(s), {took:.1f}s")]
        if self.beside_ray:  # Ray's formation owns the phase and the node counts
            self._state(Phase.STARTING_RAY, preflight=found, reason=None, marks=done)
        else:
            ray = uses_ray(self.spec)
            self._state(Phase.STARTING_RAY if ray else Phase.LOADING_MODEL, preflight=found, reason=None,
                        head_host=topo.hostname, nodes_expected=topo.num_nodes,
                        nodes_joined=0 if ray else topo.num_nodes, marks=done)
        self._rewrite(own, verdict="passed")
        warned = [c for c in found if c.status == "warn"]
        p.log(f"preflight passed on {topo.num_nodes} node(s) in {took:.2f} s"
              + (f", {len(warned)} warning(s)" if warned else ""))
        return True

    def _collect(self, own: PreflightRecord) -> dict[int, PreflightRecord] | None:
        """Every node's record of this run, or what arrived by ``ray.cluster_timeout``; None if stopped."""
        p, n = self.p, self.topo.num_nodes
        deadline = self.t0 + self.spec.ray.cluster_timeout + self.slack
        records = {0: own}
        said: list[str] | None = None
        while len(records) < n:
            for rank in range(1, n):
                if rank not in records:
                    rec = p.jobdir.read_preflight(rank, self.run_id)
                    if rec is not None:
                        records[rank] = rec
            missing = [self.hosts[r] for r in range(n) if r not in records]
            if not missing or time.monotonic() >= deadline:
                break
            if time.monotonic() - self.t0 >= PROGRESS_AFTER and missing != said:
                said = missing
                p.log(f"preflight: waiting for {', '.join(missing)}")
                waiting = f"pre-flight: waiting for {', '.join(missing)}"
                if self.beside_ray:  # Ray's formation names the missing hosts itself
                    self._state(Phase.STARTING_RAY, reason=waiting)
                else:
                    self._state(Phase.STARTING_RAY, nodes_joined=0, nodes_expected=n, missing_hosts=missing,
                                head_host=self.topo.hostname, reason=waiting,
                                marks=[Mark(name=timeline.ALLOCATED, at=p.started_at)])
            if p.stopper.wait(POLL):
                return None
        return records

    def _workers_allreduce(self, grace: float = 3.0) -> list[PreflightCheck]:
        """After a failed all-reduce: what the other nodes' children said, once they have (briefly)."""
        out: dict[int, PreflightCheck] = {}
        end = time.monotonic() + grace
        while True:
            for rank in range(1, self.topo.num_nodes):
                rec = self.p.jobdir.read_preflight(rank, self.run_id)
                bad = [c for c in (rec.checks if rec else []) if c.check == "allreduce" and c.status == "fail"]
                if bad:
                    out[rank] = bad[0]
            if len(out) == self.topo.num_nodes - 1 or time.monotonic() >= end or self.p.stopper.wait(0.2):
                return [out[r] for r in sorted(out)]

    def _last_words(self, rank: int) -> str:
        return tail_lines(self.p.jobdir.node_log(rank, self.run_id.restart or 0), 1).strip()[:160]

    # ------------------------------------------------------------ the other nodes

    def _worker(self, own: PreflightRecord, allreduce: AllReduce | None) -> bool:
        p, topo = self.p, self.topo
        head = self._wait_head(lambda r: True, self.t0 + self.spec.ray.join_timeout + self.slack,
                               "wrote no pre-flight record")
        if head is None:
            return False
        if allreduce is not None and head.rendezvous_port and not failures(own.checks):
            allreduce.go(head.ip, head.rendezvous_port)
            outcome = allreduce.wait(abort=self._head_decided, poll=0.2)
            if p.stopper.stopped:
                return False
            if not outcome.aborted:
                own = self._rewrite(own, checks=[*own.checks, allreduce_check(topo.hostname, outcome)])
                p.log(f"preflight all-reduce: {outcome.detail}")
        deadline = self.t0 + self.spec.ray.cluster_timeout + IMPORT_TIMEOUT + TIMEOUT + 30.0
        head = self._wait_head(lambda r: bool(r.verdict), deadline, "gave no pre-flight verdict")
        if head is None:
            return False
        if head.verdict == "failed":
            raise NodeError(head.reason or "preflight failed on the head")
        return True

    def _head_decided(self) -> bool:
        """Stop this node's all-reduce once the head has its verdict: it failed elsewhere, or the
        head skipped the all-reduce (a node without torch)."""
        if self.p.stopper.stopped:
            return True
        head = self.p.jobdir.read_preflight(0, self.run_id)
        return head is not None and bool(head.verdict)

    def _wait_head(self, ready: Callable[[PreflightRecord], bool], deadline: float,
                   what: str) -> PreflightRecord | None:
        """The head's record once ``ready(record)``; None if stopped; NodeError past ``deadline``
        or when the head's state is final (it failed for another reason)."""
        p = self.p
        while True:
            rec = p.jobdir.read_preflight(0, self.run_id)
            if rec is not None and ready(rec):
                return rec
            state = p.jobdir.read_state(self.run_id)
            if state is not None and state.phase.final:
                raise NodeError(f"the head reported {state.phase}: {state.reason}")
            if time.monotonic() >= deadline:
                raise NodeError(f"preflight: the head {self.topo.head_host} {what} within "
                                f"{time.monotonic() - self.t0:.0f} s (its node program never started?)")
            if p.stopper.wait(POLL):
                return None


def run(program: NodeProgram, spec: ServeSpec, topo: Topology, ports: PortPlan) -> bool:
    """The whole pre-flight, before anything else starts (the ``mp`` backend, replicas): True to
    go on, False when stopped meanwhile; raises NodeError with the diagnosis when a check failed
    (``ray.preflight: off`` skips it all)."""
    if spec.ray.preflight == "off":
        return True
    return Preflight(program, spec, topo, ports).run()


class Verdict:
    """The pre-flight's decision, reached beside Ray's formation (:func:`begin`)."""

    def __init__(self, stopper: Stopper | None = None, ok: bool = True) -> None:
        self._stopper = stopper
        self._thread: threading.Thread | None = None
        self._ok = ok
        self._error: NodeError | None = None

    def _decide(self, pre: Preflight) -> None:
        try:
            self._ok = pre.decide()
        except NodeError as e:
            self._error = e
        except Exception as e:  # noqa: BLE001 - the reason must end the job, not a thread's traceback
            self._error = NodeError(f"preflight: {type(e).__name__}: {e}")
        if self._error is not None and self._stopper is not None:
            self._stopper.fail(str(self._error))  # Ray's formation stops at once

    @classmethod
    def beside(cls, pre: Preflight, stopper: Stopper) -> Verdict:
        """``pre``'s decision, reached in a thread of its own (after its own checks passed)."""
        verdict = cls(stopper)
        verdict._thread = threading.Thread(target=verdict._decide, args=(pre,), name="preflight", daemon=True)
        verdict._thread.start()
        return verdict

    def wait(self) -> bool:
        """True to go on, False when the node was stopped; raises NodeError with the diagnosis."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)
        if self._error is not None:
            raise self._error
        return self._ok and not (self._stopper is not None and self._stopper.stopped)


#: The verdict where nothing is pending (``ray.preflight: off``, or decided before Ray).
PASSED = Verdict()


def begin(program: NodeProgram, spec: ServeSpec, topo: Topology, ports: PortPlan,
          checker: Checker | None = None) -> Verdict:
    """The pre-flight on the Ray path: this node's own checks now (before ``ray start`` binds
    the ports they test), then the exchange and the all-reduce in a thread while Ray forms; the
    head waits for the :class:`Verdict` before vLLM starts, and a failure stops the formation.
    A node whose own checks failed decides at once: no Ray on a node that cannot serve."""
    if spec.ray.preflight == "off":
        return PASSED
    pre = Preflight(program, spec, topo, ports, checker=checker, beside_ray=True)
    try:
        passed = pre.check()
    except BaseException:
        pre.close()
        raise
    if not passed:
        return Verdict(program.stopper, ok=pre.decide())  # raises the diagnosis (or stopped: False)
    return Verdict.beside(pre, program.stopper)
