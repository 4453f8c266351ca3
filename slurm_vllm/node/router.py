"""Rank 0 of a job with replicas: vllm-router on loopback, the authenticating front, the phase.

The router (vLLM's ``vllm-router``) starts with no worker and listens on ``127.0.0.1`` only;
clients reach it through the front (node/front.py), which checks the key. Rank 0 then steers it
from the replicas' own records (node/replica.py) and a ``/health`` probe of each: a replica
that answers is added (``/add_worker``), one that stops answering is taken out
(``/remove_worker``) before the router's own health check would notice, and added back once
its restart answers. The job's phase follows (:func:`summarize`): LOADING_MODEL until
``min_ready_replicas`` answer and a one-token completion through the front succeeds, then
READY, DEGRADED while fewer than that serve, FAILED only when no replica is left.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slurm_vllm import direct_http
from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import Phase, ReplicaRecord, write_state
from slurm_vllm.node import serve
from slurm_vllm.node.context import NodeContext
from slurm_vllm.node.lifecycle import TIME_LIMIT, OwnedProcess
from slurm_vllm.node.moments import probe_completion

#: How rank 0 starts a process it owns (NodeProgram.start): name, argv, env, log file.
Starter = Callable[[str, list[str], Mapping[str, str], Path], OwnedProcess]

LOOPBACK = "127.0.0.1"
#: How often rank 0 looks at the replicas (records, /health, the router's worker list).
POLL = 1.0
#: Timeout of the one-token completion that proves the whole path before READY.
COMPLETION_TIMEOUT = 120.0


def require_router() -> None:
    """vllm-router must be importable by this node's Python (the launcher below runs it there)."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("vllm_router") is None:
        raise NodeError("replicas need vllm-router in the nodes' environment, and it is not installed there: "
                        "pip install 'slurm-vllm[node]' (or vllm-router) into the job's venv or image")


def router_argv(*, port: int, metrics_port: int, policy: str | None, key_file: Path | None) -> list[str]:
    """vllm-router on loopback, no worker yet, its metrics on loopback, launched by :func:`main`
    so that its key (for its own calls to the replicas, e.g. the tokenizing its cache-aware
    policy needs) is read from the key file and never shows on a command line."""
    argv = [sys.executable, "-m", "slurm_vllm.node.router"]
    if key_file is not None:
        argv += ["--key-file", str(key_file)]
    argv += ["--", "--host", LOOPBACK, "--port", str(port),
             "--prometheus-host", LOOPBACK, "--prometheus-port", str(metrics_port)]
    if policy:
        argv += ["--policy", policy]
    return argv


def front_argv(*, host: str, port: int, router_port: int, metrics_port: int, key_file: Path | None) -> list[str]:
    """The authenticating front (node/front.py), run by this node's own Python."""
    argv = [sys.executable, "-m", "slurm_vllm.node.front", "--host", host, "--port", str(port),
            "--router", f"http://{LOOPBACK}:{router_port}", "--metrics", f"http://{LOOPBACK}:{metrics_port}"]
    return argv + (["--key-file", str(key_file)] if key_file is not None else [])


#: A replica's URL as the router takes it: its root, without ``/v1``.
worker_url = direct_http.root_url


@dataclass(frozen=True)
class Summary:
    """The job's phase from its replicas: ``ready`` of ``expected`` are in the router."""

    phase: Phase
    ready: int
    expected: int
    reason: str = ""


def summarize(records: Sequence[ReplicaRecord | None], routed: set[int], *, min_ready: int,
              served_before: bool) -> Summary:
    """The job's phase (pure): ``routed`` are the indices the router sends requests to now.

    FAILED only when every replica failed for good; before the first READY the job is loading;
    after it, READY while at least ``min_ready`` serve, else DEGRADED (it keeps serving).
    """
    expected = len(records)
    ready = len(routed)
    failed = [r for r in records if r is not None and r.phase == "failed"]
    if expected and len(failed) == expected:
        return Summary(Phase.FAILED, 0, expected, "no replica is left: " + "; ".join(r.reason for r in failed))
    if not served_before:
        return Summary(Phase.LOADING_MODEL, ready, expected)
    if ready >= min_ready:
        return Summary(Phase.READY, ready, expected)
    down = [r for r in records if r is not None and r.index not in routed]
    reason = "; ".join(f"replica {r.index}: {r.phase}" + (f" ({r.reason})" if r.reason else "") for r in down)
    return Summary(Phase.DEGRADED, ready, expected, reason)


class RouterAdmin:
    """The router's admin routes, called on loopback only."""

    def __init__(self, port: int) -> None:
        self.base = f"http://{LOOPBACK}:{port}"

    def workers(self) -> set[str] | None:
        try:
            status, body = direct_http.get(self.base + "/list_workers", timeout=5.0)
            return set(json.loads(body).get("urls") or []) if status == 200 else None
        except (OSError, ValueError):
            return None

    def add(self, url: str) -> bool:
        return self._call("/add_worker", url)

    def remove(self, url: str) -> bool:
        return self._call("/remove_worker", url)

    def _call(self, route: str, url: str) -> bool:
        try:
            status, _ = direct_http.post(f"{self.base}{route}?url={urllib.parse.quote(url, safe='')}", timeout=30.0)
        except OSError:
            return False
        return status == 200


def healthy(url: str) -> bool:
    """A replica's ``/health`` answers (no key needed, as in vLLM)."""
    try:
        return direct_http.get(worker_url(url) + "/health", timeout=2.0)[0] == 200
    except OSError:
        return False


def complete_one_token(base_url: str, api_key: str | None) -> str | None:
    """One-token completion through ``base_url`` (the front): the model id on success."""
    root = worker_url(base_url)
    model = serve.probe(root, api_key, timeout=10.0)
    if model is None:
        return None
    ok, _ = probe_completion(root, api_key, model, COMPLETION_TIMEOUT)
    return model if ok else None


class RouterSupervisor:
    """Rank 0's loop: start router and front, steer the router, write the job's state."""

    def __init__(self, ctx: NodeContext, start: Starter) -> None:
        self.ctx = ctx
        self.start = start
        self.served = False
        self.last: dict[str, Any] = {}

    def run(self, replica_thread: threading.Thread | None = None) -> int:
        ctx, ports, spec = self.ctx, self.ctx.ports, self.ctx.spec
        key_file = ctx.jobdir.api_key if spec.serve.api_key else None
        key = ctx.jobdir.read_secret(ctx.jobdir.api_key) if key_file else None
        log = ctx.jobdir.router_log(ctx.run.restart or 0)
        start = self.start
        require_router()
        router: OwnedProcess = start("vllm-router", router_argv(port=ports.router, metrics_port=ports.router_metrics,
                                                              policy=spec.serve.router_policy, key_file=key_file),
                                     ctx.env, log)
        front: OwnedProcess = start("front", front_argv(host=ctx.ip, port=ports.front, router_port=ports.router,
                                                      metrics_port=ports.router_metrics, key_file=key_file),
                                    ctx.env, log)
        ctx.log(f"router on {LOOPBACK}:{ports.router} behind the front http://{ctx.ip}:{ports.front}/v1; "
                f"output in {log}")
        admin = RouterAdmin(ports.router)
        public = f"http://{ctx.ip}:{ports.front}/v1"
        n = spec.replicas
        while not ctx.stop_event.wait(POLL):
            for name, proc in (("vllm-router", router), ("the front", front)):
                if not proc.running:
                    failed = ctx.stopper.fail_unless_signalled(f"{name} exited (code {proc.poll()}); see {log}")
                    return 1 if failed else 0
            records = [ctx.jobdir.read_replica(i, ctx.run) for i in range(n)]
            routed = self._steer(admin, records)
            if not self.served and len(routed) >= spec.min_ready_replicas:
                model = complete_one_token(public, key)
                if model is not None:
                    self.served = True
                    serve.write_endpoint(ctx.jobdir, ctx.run, ip=ctx.ip, port=ports.front, model=model,
                                         host=ctx.head_host)
                    ctx.log(f"READY {len(routed)}/{n} replicas at {public}")
            summary = summarize(records, routed, min_ready=spec.min_ready_replicas, served_before=self.served)
            self._publish(summary, records)
            if summary.phase is Phase.FAILED:
                ctx.fail(summary.reason)
                return 1
        if ctx.stop_reason == TIME_LIMIT:
            self._wait_for_replicas(replica_thread)  # they drain their requests through the router
        return 0

    def _steer(self, admin: RouterAdmin, records: Sequence[ReplicaRecord | None]) -> set[int]:
        """Add the replicas that answer, take out those that do not; the indices now routed.

        A worker the job never added is taken out at once: only a process on this node can
        have registered it, through the router's loopback port (it checks no key), and it would
        receive the users' prompts and keys. The front and ``exclusive`` nodes are the defence;
        this bounds what a neighbour on a shared node gets to one poll and names it in the log.
        """
        actual = admin.workers()
        if actual is None:
            return set()
        ours = {worker_url(rec.url) for rec in records if rec is not None and rec.url}
        for stranger in sorted(actual - ours):
            if admin.remove(stranger):
                self.ctx.log(f"WARNING: took {stranger} out of the router: the job never added it (a process on "
                             f"{self.ctx.topology.hostname} registered it through the router's loopback port)")
                actual.discard(stranger)
        routed = set()
        for rec in records:
            if rec is None or not rec.url:
                continue
            url = worker_url(rec.url)
            want = rec.serving and healthy(rec.url)
            if want and url not in actual and admin.add(url):
                self.ctx.log(f"replica {rec.index} added to the router ({url})")
                actual.add(url)
            elif not want and url in actual and admin.remove(url):
                self.ctx.log(f"replica {rec.index} taken out of the router ({rec.phase})")
                actual.discard(url)
            if want and url in actual:
                routed.add(rec.index)
        return routed

    def _publish(self, summary: Summary, records: Sequence[ReplicaRecord | None]) -> None:
        """state.json, rewritten only when something a reader sees changed."""
        # The run is the state's own; the time changes always; ``master`` is the replica's nodes' business.
        own = {"updated_at", "job_id", "restart", "master"}
        listed = [r.model_dump(mode="json", exclude=own) for r in records if r is not None]
        fields: dict[str, Any] = dict(reason=summary.reason, replicas=listed, replicas_ready=summary.ready,
                                         replicas_expected=summary.expected,
                                         router_address=f"{LOOPBACK}:{self.ctx.ports.router}")
        if (summary.phase, fields) == (self.last.get("phase"), self.last.get("fields")):
            return
        self.last = {"phase": summary.phase, "fields": fields}
        write_state(self.ctx.jobdir, self.ctx.run, summary.phase, **fields)

    def _wait_for_replicas(self, replica_thread: threading.Thread | None) -> None:
        """On a stop: keep router and front up until every replica has drained or stopped."""
        ctx = self.ctx
        deadline = time.monotonic() + ctx.spec.resources.signal_grace
        if replica_thread is not None:
            replica_thread.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            records = [ctx.jobdir.read_replica(i, ctx.run) for i in range(ctx.spec.replicas)]
            if all(r is None or r.phase in ("ended", "failed") for r in records):
                return
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """``python -m slurm_vllm.node.router [--key-file F] -- ROUTER_ARGS``: vllm-router with the
    job's key read from its file (vllm-router itself only takes ``--api-key KEY``)."""
    import argparse  # noqa: PLC0415

    args = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = (args[: args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    p = argparse.ArgumentParser(prog="python -m slurm_vllm.node.router")
    p.add_argument("--key-file", type=Path)
    opts = p.parse_args(ours)
    from vllm_router.launch_router import launch_router, parse_router_args  # noqa: PLC0415 - node side only

    router_args = parse_router_args(theirs)
    if opts.key_file is not None:
        router_args.api_key = opts.key_file.read_text(encoding="utf-8").strip()
    launch_router(router_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
