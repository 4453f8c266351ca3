"""Weights staged to node-local storage before ``vllm serve`` (``stage_weights: local | shm``).

Reading a large checkpoint from a shared filesystem on every node at once is what keeps a big
model from answering; each node's own disk or ``/dev/shm`` reads it back at local speed. Each
node's node program copies the model for its own node (so every node copies in parallel) to

    <target>/svl-u<uid>/models/<name>-<key>/        (folders 0700, owned by the user)

where ``<target>`` is ``/dev/shm`` for ``shm``; for ``local`` the first of ``$SLURM_TMPDIR``,
``$TMPDIR`` that is set, exists and is not on a network filesystem, else ``/tmp`` (refused if
even that is a network mount: staging there would gain nothing). ``<key>`` hashes the source's
real path and every file's name, size and modification time, so a changed model never reuses
an old copy, and every node (same environment, same source) computes the same path, which the
Ray backend needs: vLLM's workers on the other nodes load the path the head passes.

- The **manifest** is the relative names and sizes of the source's files; names starting with
  ``.`` (``.git``, ``.cache``, ``.gitattributes``) are skipped, everything else (config,
  tokenizer, weights) is copied. It is checked against the copy after copying, and against a
  copy found already there, which is then reused; a copy that differs is a named failure.
- **Space** is checked first (``statvfs``): the model plus a margin must fit, or the node fails
  with the numbers and the other choices. There is never a silent fallback.
- The copy goes to a temporary sibling and is renamed into place (atomic). Two jobs staging the
  same model on one node both copy; the one that loses the rename verifies the winner's copy
  and uses it.
- **Removal**: each job using a copy registers itself (``.users/<name>/<pid>@<host>``) under a
  per-user lock. At the end the last live user removes the copy, unless a job using it asked to
  keep it (``keep_staged``). What node programs that died left (their pid is gone on this
  host: entries, half copies, copies nobody uses) is swept. Where copies live and who uses
  them is node/staged_store.py.
- The head marks the timeline (``staging``, ``staged``); the other nodes wait for that mark
  after their own copy, so that their join deadline does not run out on the head's copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from slurm_vllm import timeline
from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import JobDir, Mark, Phase, Run, write_state
from slurm_vllm.node.staged_store import (
    StagingError,
    StatVfs,
    check_space,
    gib,
    live_users,
    locked,
    margin,
    me,
    private_dir,
    register,
    sweep,
    target_dir,
    temp_path,
    users_dir,
)
from slurm_vllm.node.topology import Topology
from slurm_vllm.node.warm import read_mounts
from slurm_vllm.spec import ServeSpec

__all__ = ["Staged", "StagingError", "differences", "manifest", "release", "scan", "stage", "stage_node"]

#: What the copy records about itself, inside the copy (a hidden name: not in the manifest).
META = ".slurm_vllm-staged.json"
#: Files copied at once: parallel reads help on network filesystems; more only adds seeks.
COPY_THREADS = 8

#: Relative file name -> size in bytes.
Manifest = dict[str, int]
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# What is copied
# --------------------------------------------------------------------------------------------


def scan(root: Path) -> dict[str, os.stat_result]:
    """Every file under ``root`` vLLM may read, by relative name; hidden names skipped.

    Symbolic links are followed (a hub cache's snapshot is links to blobs); a folder reached
    twice through links is read once.
    """
    found: dict[str, os.stat_result] = {}
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder, name)
            try:
                st = path.stat()
            except OSError as exc:
                raise StagingError(f"cannot read {path} ({exc.strerror or exc}): fix the model directory "
                                   "or use stage_weights: none") from None
            if stat.S_ISREG(st.st_mode):
                found[path.relative_to(root).as_posix()] = st
    return found


def manifest(root: Path) -> Manifest:
    """Relative names and sizes of the files under ``root`` (see :func:`scan`)."""
    return {name: st.st_size for name, st in scan(root).items()}


def differences(expected: Manifest, found: Manifest, shown: int = 4) -> str:
    """What ``found`` lacks, has too much or has at another size; '' when they are the same."""
    problems = [f"{n} missing" for n in sorted(set(expected) - set(found))]
    problems += [f"{n} not in the model" for n in sorted(set(found) - set(expected))]
    problems += [f"{n} has {found[n]} bytes, not {expected[n]}" for n in sorted(set(expected) & set(found))
                 if found[n] != expected[n]]
    more = f" and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def copy_key(source: Path, files: Mapping[str, os.stat_result]) -> str:
    """A short hash of the source's real path and its files' names, sizes and times."""
    h = hashlib.sha256(os.path.realpath(source).encode())
    for name in sorted(files):
        h.update(f"\0{name}\0{files[name].st_size}\0{files[name].st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:64] or "model"


# --------------------------------------------------------------------------------------------
# Staging and removal
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staged:
    """A copy this node program uses: where it lies, and what :func:`release` needs."""

    path: Path
    source: str
    host: str
    keep: bool
    reused: bool

    @property
    def models(self) -> Path:
        return self.path.parent


def copy_files(src: Path, dst: Path, files: Manifest, stop: threading.Event | None = None,
               threads: int = COPY_THREADS) -> bool:
    """Copy ``files`` from ``src`` to ``dst``, largest first, several at once; False when stopped.

    A stop (scancel) is seen between files: a half-finished copy is removed by the caller.
    """
    for name in files:
        (dst / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    halt = threading.Event()  # one file failed: the others need not be copied

    def one(name: str) -> None:
        if halt.is_set() or (stop is not None and stop.is_set()):
            return
        try:
            shutil.copyfile(src / name, dst / name)
        except BaseException:
            halt.set()
            raise

    order = sorted(files, key=lambda n: -files[n])
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(order))), thread_name_prefix="stage") as pool:
        for future in [pool.submit(one, name) for name in order]:
            future.result()
    return stop is None or not stop.is_set()


def _check_copy(path: Path, files: Manifest, host: str, source: Path) -> None:
    problems = differences(files, manifest(path))
    if problems:
        raise StagingError(f"{host}: the staged copy {path} differs from {source}: {problems}: remove it "
                           f"(rm -r {path}) or use stage_weights: none")


def _saved(path: Path) -> str:
    try:
        seconds = float(json.loads((path / META).read_text()).get("copy_seconds", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return ""
    return f", saving the {seconds:.3g} s its copy took" if seconds else ""


def stage(source: str, mode: str, *, host: str, job_id: str, keep: bool, env: Mapping[str, str], log: Log,
          stop: threading.Event | None = None, statvfs: StatVfs = os.statvfs, mounts_text: str | None = None,
          threads: int = COPY_THREADS) -> Staged | None:
    """Stage ``source`` to this node's ``mode`` storage; the copy to serve, or None when stopped."""
    src = Path(source)
    if not (src / "config.json").is_file():
        raise StagingError(f"{host}: cannot stage {source}: no config.json there (is it mounted on this node?); "
                           "use stage_weights: none")
    entries = scan(src)
    files = {name: st.st_size for name, st in entries.items()}
    total = sum(files.values())
    try:
        target, chosen = target_dir(mode, env, read_mounts() if mounts_text is None else mounts_text)
        models = private_dir(private_dir(target / f"svl-u{os.getuid()}", os.getuid()) / "models", os.getuid())
    except StagingError as exc:
        raise StagingError(f"{host}: {exc}") from None
    name = f"{_safe(src.name)}-{copy_key(src, entries)}"
    final = models / name
    with locked(models):
        for gone in sweep(models, host):
            log(f"removed {gone}, left by a node program that no longer runs")
        if final.is_dir():
            _check_copy(final, files, host, src)
            register(models, name, host, job_id, keep)
            log(f"weights already staged at {final} ({len(files)} files, {gib(total)}, manifest checked): "
                f"reused{_saved(final)}")
            return Staged(final, source, host, keep, reused=True)
    check_space(target, total, margin(total, env), host, mode, statvfs)
    tmp = temp_path(models, "part", name, host)
    os.mkdir(tmp, 0o700)
    t0 = time.monotonic()
    log(f"staging {len(files)} files ({gib(total)}) from {src} to {final} ({chosen}), {threads} at a time")
    try:
        try:
            done = copy_files(src, tmp, files, stop, threads)
        except OSError as exc:
            raise StagingError(f"{host}: copying the model to {target} failed: {exc.strerror or exc}"
                               f"{' ' + repr(exc.filename) if exc.filename else ''}: use stage_weights: "
                               f"{'local' if mode == 'shm' else 'shm'} or none") from None
        if not done:
            log("staging stopped before the copy was complete; the partial copy is removed")
            return None
        problems = differences(files, manifest(tmp))
        if problems:
            raise StagingError(f"{host}: the copy in {target} differs from {src}: {problems}: did the model "
                               "change while it was copied? Resubmit, or use stage_weights: none")
        seconds = time.monotonic() - t0
        rate = total / 1e6 / max(seconds, 1e-6)
        (tmp / META).write_text(json.dumps({"source": source, "files": len(files), "bytes": total, "job_id": job_id,
                                            "host": host, "copy_seconds": round(seconds, 3),
                                            "mb_per_s": round(rate, 1), "at": time.time()}) + "\n")
        with locked(models):
            try:
                os.rename(tmp, final)
                log(f"staged {gib(total)} in {seconds:.1f} s ({rate:.0f} MB/s) at {final}")
                reused = False
            except OSError:  # another job of the same model renamed its copy first
                _check_copy(final, files, host, src)
                log(f"another job staged {final} first ({seconds:.1f} s spent copying); its copy is checked "
                    "and used")
                reused = True
            register(models, name, host, job_id, keep)
        return Staged(final, source, host, keep, reused=reused)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def release(staged: Staged | None, log: Log) -> None:
    """The job is done with ``staged``: remove it when no other live job uses it and nobody asked
    to keep it. Never raises: teardown must go on."""
    if staged is None:
        return
    models, name = staged.models, staged.path.name
    try:
        with locked(models):
            (users_dir(models, name) / me(staged.host)).unlink(missing_ok=True)
            others = live_users(models, name, staged.host)
            kept = staged.keep or (users_dir(models, name) / "keep").exists()
            if others or kept:
                log(f"staged weights kept at {staged.path} "
                    + (f"({len(others)} other job(s) use them)" if others else "(keep_staged)"))
                return
            gone = temp_path(models, "gone", name, staged.host)
            os.rename(staged.path, gone)
            shutil.rmtree(users_dir(models, name), ignore_errors=True)
        shutil.rmtree(gone, ignore_errors=True)
        log(f"removed the staged weights {staged.path}")
    except OSError as exc:
        log(f"could not remove the staged weights {staged.path}: {exc.strerror or exc}")


def stage_node(spec: ServeSpec, topo: Topology, jobdir: JobDir, run: Run, env: Mapping[str, str], log: Log,
               stop: threading.Event) -> Staged | None:
    """The node program's one call: stage this node's copy as the spec asks (None: not asked, or
    stopped).

    The head marks the timeline (``staging``, ``staged``), so that the other nodes, which wait
    for the head after their own copy, know it is still copying (a node that reuses a copy would
    otherwise spend its join deadline on the head's copy). A failure raises
    :class:`StagingError`; on a node other than the head it is also written to ``state.json``
    at once (the head may have published itself already, and srun ends it when this node
    exits), unless the run already has a final phase.
    """
    if spec.model.stage_weights == "none":
        return None
    # The phase the head's role writes next: the staging marks go in with it.
    phase = Phase.STARTING_RAY if spec.executor == "ray" else Phase.LOADING_MODEL
    if topo.is_head:
        write_state(jobdir, run, phase, marks=[Mark(name=timeline.STAGING, at=time.time())], head_host=topo.hostname,
                    reason="staging weights")
    try:
        staged = stage(spec.model.name, spec.model.stage_weights, host=topo.hostname, job_id=topo.job_id,
                       keep=spec.model.keep_staged, env=env, log=log, stop=stop)
    except StagingError as exc:
        state = jobdir.read_state(run)
        if not topo.is_head and not (state is not None and state.phase.final):
            write_state(jobdir, run, Phase.FAILED, reason=str(exc), reported_by=topo.hostname, log_tail="")
        raise
    if staged is not None and topo.is_head:
        state = jobdir.read_state(run)
        if state is not None and state.phase.final:  # another node failed meanwhile: its reason stays
            release(staged, log)
            raise NodeError(f"{state.reported_by or 'another node'} ended the run: {state.reason}")
        write_state(jobdir, run, phase, reason="", marks=[
            Mark(name=timeline.STAGED, at=time.time(), detail="reused" if staged.reused else "")])
    elif staged is not None and spec.replicas == 1:
        wait_head_staged(jobdir, run, stop, float(spec.ray.join_timeout), log)
    return staged


def wait_head_staged(jobdir: JobDir, run: Run, stop: threading.Event, timeout: float, log: Log,
                     poll: float = 1.0) -> None:
    """On a node other than the head: return once the head has staged its copy (or published
    itself, or ended, or the node stops), so the role's own join deadline starts from there.

    While the head's timeline says it is staging there is no deadline: it is working, and if it
    dies srun ends the step. Until the head's state shows up at all, ``timeout`` applies.
    """
    deadline = time.monotonic() + timeout
    said = False
    while not stop.is_set():
        state = jobdir.read_state(run)
        names = {m.name for m in state.timeline} if state is not None else set()
        if jobdir.read_head(run) is not None or (state is not None and state.phase.final) or timeline.STAGED in names:
            return
        if timeline.STAGING not in names and time.monotonic() >= deadline:
            return  # the role's own wait names what is missing
        if timeline.STAGING in names and not said:
            log("weights staged here; waiting for the head to finish its copy")
            said = True
        stop.wait(poll)
