"""Weights staged to node-local storage: the manifest, the target, the space check, the copy and
its check, reuse, two stagers racing on the rename, removal by the last user, and the hook's
reports to state.json. Every model here is a few bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from slurm_vllm import timeline
from slurm_vllm.errors import NodeError
from slurm_vllm.jobdir import JobDir, Mark, Phase, Run, write_state
from slurm_vllm.node import staged_store, staging
from slurm_vllm.node.staging import StagingError
from slurm_vllm.node.topology import Topology
from slurm_vllm.spec import ServeSpec

MOUNTS_NFS_TMP = "nas:/scratch {tmp} nfs rw 0 0\n"


def make_model(root: Path) -> Path:
    """A tiny model folder: config, tokenizer, two shards, a subfolder, hidden things."""
    model = root / "src" / "Tiny-Model.v2"
    (model / "sub").mkdir(parents=True)
    (model / ".git").mkdir()
    (model / "config.json").write_text('{"model_type": "tiny"}')
    (model / "tokenizer.json").write_text("{}" * 10)
    (model / "model-00001-of-00002.safetensors").write_bytes(b"a" * 300)
    (model / "model-00002-of-00002.safetensors").write_bytes(b"b" * 200)
    (model / "sub" / "extra.txt").write_text("x")
    (model / ".gitattributes").write_text("*")
    (model / ".git" / "HEAD").write_text("ref")
    return model


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path)


@pytest.fixture
def local(tmp_path: Path) -> dict[str, str]:
    """An environment whose $TMPDIR is a folder of this test (the ``local`` target)."""
    (tmp_path / "local").mkdir()
    return {"TMPDIR": str(tmp_path / "local")}


def free(n: int) -> SimpleNamespace:
    return SimpleNamespace(f_bavail=n, f_frsize=1)


def plenty(_path: str) -> SimpleNamespace:
    return free(10 * 2**30)


def do_stage(src: Path, env: dict[str, str], log: list[str] | None = None, host: str = "n1", keep: bool = False,
             **kw: object) -> staging.Staged | None:
    out = [] if log is None else log
    return staging.stage(str(src), "local", host=host, job_id="42", keep=keep, env=env, log=out.append,
                         mounts_text="", statvfs=kw.pop("statvfs", plenty), **kw)  # type: ignore[arg-type]


def models_dir(env: dict[str, str]) -> Path:
    return Path(env["TMPDIR"]) / f"svl-u{os.getuid()}" / "models"


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------


def test_the_manifest_is_names_and_sizes_without_hidden_entries(model: Path) -> None:
    assert staging.manifest(model) == {
        "config.json": 22, "tokenizer.json": 20, "model-00001-of-00002.safetensors": 300,
        "model-00002-of-00002.safetensors": 200, "sub/extra.txt": 1}


def test_the_manifest_follows_links_as_a_hub_snapshot_has_them(tmp_path: Path) -> None:
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    (blobs / "abc").write_bytes(b"12345")
    (snap / "config.json").symlink_to(blobs / "abc")
    (snap / "loop").symlink_to(snap)  # a folder reached twice is read once
    assert staging.manifest(snap) == {"config.json": 5}


def test_differences_name_missing_extra_and_resized_files() -> None:
    text = staging.differences({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4})
    assert text == "c missing; d not in the model; b has 5 bytes, not 2"
    assert staging.differences({"a": 1}, {"a": 1}) == ""
    many = staging.differences({f"f{i}": 1 for i in range(7)}, {})
    assert many.endswith("and 3 more")


def test_the_key_changes_when_a_file_changes(model: Path) -> None:
    before = staging.copy_key(model, staging.scan(model))
    (model / "config.json").write_text('{"model_type": "TINY"}')  # same size, new time
    os.utime(model / "config.json", ns=(1, 1))
    assert staging.copy_key(model, staging.scan(model)) != before


# --------------------------------------------------------------------------------------------
# where, and whether it fits
# --------------------------------------------------------------------------------------------


def test_local_prefers_slurm_tmpdir_then_tmpdir_unless_on_a_network_mount(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert staged_store.target_dir("local", {"SLURM_TMPDIR": str(a), "TMPDIR": str(b)}, "") == (a, "$SLURM_TMPDIR")
    nfs = f"nas:/x {os.path.realpath(a)} nfs4 rw 0 0\n"
    assert staged_store.target_dir("local", {"SLURM_TMPDIR": str(a), "TMPDIR": str(b)}, nfs) == (b, "$TMPDIR")
    assert staged_store.target_dir("local", {"TMPDIR": str(tmp_path / "missing")}, "") == (Path("/tmp"), "/tmp")
    assert staged_store.target_dir("shm", {}, "")[0] == Path("/dev/shm")


def test_local_refuses_a_tmp_on_a_network_filesystem() -> None:
    with pytest.raises(StagingError, match="no node-local disk: /tmp is on nfs.*stage_weights: shm or none"):
        staged_store.target_dir("local", {}, MOUNTS_NFS_TMP.format(tmp=os.path.realpath("/tmp")))


def test_too_little_space_is_refused_with_the_numbers_and_nothing_is_copied(model: Path, local: dict[str, str]) -> None:
    with pytest.raises(StagingError) as info:
        do_stage(model, local, statvfs=lambda _p: free(100))
    assert str(info.value).startswith(f"n1: {local['TMPDIR']} has 0.0 MiB free, the model needs 256.0 MiB")
    assert str(info.value).endswith("use stage_weights: shm or none")
    assert [p.name for p in models_dir(local).iterdir()] == [".lock"]


def test_the_shm_refusal_names_local_and_the_reserve_can_be_set() -> None:
    with pytest.raises(StagingError, match=r"^n2: /dev/shm has 3\.1 GiB free, the model needs 12\.4 GiB .*"
                                           r"use stage_weights: local or none$"):
        staged_store.check_space(Path("/dev/shm"), int(12.0 * 2**30), int(0.4 * 2**30), "n2", "shm",
                                 statvfs=lambda _p: free(int(3.1 * 2**30)))
    assert staged_store.margin(10, {"SLURM_VLLM_STAGE_RESERVE": "2G"}) == 2 * 2**30
    assert staged_store.margin(10, {}) == staged_store.MIN_MARGIN
    assert staged_store.margin(100 * 2**30, {}) == 2 * 2**30


def test_a_folder_of_another_owner_or_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "svl-u1").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StagingError, match="is not a folder of this user"):
        staged_store.private_dir(tmp_path / "svl-u1", os.getuid())
    with pytest.raises(StagingError, match="owned by uid"):
        staged_store.private_dir(tmp_path / "elsewhere", os.getuid() + 1)
    (tmp_path / "open").mkdir(mode=0o755)
    assert staged_store.private_dir(tmp_path / "open", os.getuid()).stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------------------------
# copy, check, reuse
# --------------------------------------------------------------------------------------------


def test_a_copy_is_made_checked_and_then_reused(model: Path, local: dict[str, str]) -> None:
    log: list[str] = []
    first = do_stage(model, local, log)
    assert first is not None and not first.reused
    assert first.path.parent == models_dir(local) and first.path.name.startswith("Tiny-Model_v2-")
    assert staging.manifest(first.path) == staging.manifest(model)
    assert not (first.path / ".git").exists()
    assert (models_dir(local).parent.stat().st_mode & 0o777) == 0o700
    assert any("MB/s" in line for line in log)
    assert [p.name for p in models_dir(local).iterdir() if p.name.startswith(".part")] == []

    again: list[str] = []
    second = do_stage(model, local, again, host="n2")
    assert second is not None and second.reused and second.path == first.path
    assert "reused, saving the" in again[-1] and "manifest checked" in again[-1]


def test_a_staged_copy_that_differs_is_a_named_failure(model: Path, local: dict[str, str]) -> None:
    first = do_stage(model, local)
    assert first is not None
    (first.path / "model-00002-of-00002.safetensors").write_bytes(b"b" * 10)  # damaged on the node
    with pytest.raises(StagingError, match=r"n1: the staged copy .* differs from .*: "
                                           r"model-00002-of-00002.safetensors has 10 bytes, not 200: remove it"):
        do_stage(model, local)


def test_a_copy_that_comes_out_different_fails_and_leaves_nothing(model: Path, local: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def short_copy(src: Path, dst: Path, *_a: object) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:3])

    monkeypatch.setattr(staging.shutil, "copyfile", short_copy)
    with pytest.raises(StagingError, match=r"n1: the copy in .* differs from .*: config.json has 3 bytes, not 22"):
        do_stage(model, local)
    assert sorted(p.name for p in models_dir(local).iterdir()) == [".lock"]


def test_a_failed_copy_names_the_cause(model: Path, local: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    def full(src: Path, dst: Path, *_a: object) -> None:
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(staging.shutil, "copyfile", full)
    with pytest.raises(StagingError, match="n1: copying the model to .* failed: No space left on device"):
        do_stage(model, local)
    assert sorted(p.name for p in models_dir(local).iterdir()) == [".lock"]


def test_a_stop_during_the_copy_removes_the_partial_copy(model: Path, local: dict[str, str]) -> None:
    stop = threading.Event()
    stop.set()
    assert do_stage(model, local, stop=stop) is None
    assert sorted(p.name for p in models_dir(local).iterdir()) == [".lock"]


def test_a_folder_without_config_is_refused(tmp_path: Path, local: dict[str, str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StagingError, match="no config.json there"):
        do_stage(tmp_path / "empty", local)


def test_two_stagers_racing_on_the_rename_share_the_winners_copy(model: Path, local: dict[str, str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    both_copied = threading.Barrier(2, timeout=10)
    copy = staging.copy_files

    def copy_then_wait(*a: object, **kw: object) -> bool:
        done = copy(*a, **kw)  # type: ignore[arg-type]
        both_copied.wait()  # neither has renamed yet: both made a full copy
        return done

    monkeypatch.setattr(staging, "copy_files", copy_then_wait)
    results: dict[str, staging.Staged | None] = {}
    logs: dict[str, list[str]] = {"n1": [], "n2": []}

    def run(host: str) -> None:
        results[host] = do_stage(model, local, logs[host], host=host)

    threads = [threading.Thread(target=run, args=(h,)) for h in ("n1", "n2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    a, b = results["n1"], results["n2"]
    assert a is not None and b is not None and a.path == b.path
    assert sorted([a.reused, b.reused]) == [False, True]
    loser = "n1" if a.reused else "n2"
    assert "another job staged" in logs[loser][-1]
    assert [p.name for p in models_dir(local).iterdir() if p.name.startswith(".part")] == []
    assert len(list((models_dir(local) / ".users" / a.path.name).glob("*@*"))) == 2


# --------------------------------------------------------------------------------------------
# removal
# --------------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_the_last_user_removes_the_copy(model: Path, local: dict[str, str]) -> None:
    staged = do_stage(model, local)
    assert staged is not None
    log: list[str] = []
    staging.release(staged, log.append)
    assert not staged.path.exists() and not (models_dir(local) / ".users" / staged.path.name).exists()
    assert log == [f"removed the staged weights {staged.path}"]
    staging.release(None, log.append)  # nothing staged: nothing to do


def test_a_copy_another_live_job_uses_is_left_alone(model: Path, local: dict[str, str]) -> None:
    mine = do_stage(model, local, host="n1")
    other = do_stage(model, local, host="n2")  # same pid, another host: counted as alive
    assert mine is not None and other is not None
    log: list[str] = []
    staging.release(mine, log.append)
    assert mine.path.exists() and "1 other job(s) use them" in log[-1]
    staging.release(other, log.append)
    assert not mine.path.exists()


def test_entries_of_dead_node_programs_do_not_keep_a_copy(model: Path, local: dict[str, str]) -> None:
    staged = do_stage(model, local)
    assert staged is not None
    (models_dir(local) / ".users" / staged.path.name / f"{dead_pid()}@n1").write_text("41\n")
    staging.release(staged, [].append)
    assert not staged.path.exists()


def test_keep_staged_keeps_the_copy_for_later_jobs(model: Path, local: dict[str, str]) -> None:
    kept = do_stage(model, local, keep=True)
    assert kept is not None
    log: list[str] = []
    staging.release(kept, log.append)
    assert kept.path.exists() and "(keep_staged)" in log[-1]
    later = do_stage(model, local)  # a job that did not ask to keep it reuses it and leaves it
    assert later is not None and later.reused
    staging.release(later, log.append)
    assert kept.path.exists()


def test_what_dead_node_programs_left_is_swept(model: Path, local: dict[str, str]) -> None:
    staged = do_stage(model, local)
    assert staged is not None
    models = models_dir(local)
    users = models / ".users" / staged.path.name
    (users / staged_store.me("n1")).rename(users / f"{dead_pid()}@n1")  # its job was killed
    half = models / f".part-x-abc~{dead_pid()}@n1"
    half.mkdir()
    foreign = models / f".part-y-abc~{dead_pid()}@n9"  # another host's: unknown, kept
    foreign.mkdir()
    log: list[str] = []
    again = do_stage(model, local, log)
    assert again is not None and not again.reused  # the orphan was removed, then copied anew
    assert not half.exists() and foreign.exists()
    assert any("left by a node program that no longer runs" in line for line in log)


# --------------------------------------------------------------------------------------------
# the node program's hook
# --------------------------------------------------------------------------------------------


def topo(rank: int) -> Topology:
    return Topology(job_id="42", rank=rank, num_nodes=2, hostname=f"n{rank + 1}", hosts=("n1", "n2"),
                    head_host="n1", head_ip="10.0.0.1", node_ip=f"10.0.0.{rank + 1}", interface="eth0")


def test_no_staging_asked_is_no_work(tmp_path: Path) -> None:
    jobdir = JobDir(tmp_path / "job").create()
    assert staging.stage_node(ServeSpec("org/m"), topo(0), jobdir, Run("42"), {}, print, threading.Event()) is None


def test_the_head_marks_the_timeline_and_a_worker_fails_with_its_reason(
        model: Path, local: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "read_mounts", lambda: "")
    jobdir, run = JobDir(tmp_path / "job").create(), Run("42")
    spec = ServeSpec(str(model), nodes=2, stage_weights="local")
    staged = staging.stage_node(spec, topo(0), jobdir, run, local, [].append, threading.Event())
    assert staged is not None
    state = jobdir.read_state(run)
    assert state is not None and state.phase is Phase.STARTING_RAY
    assert [m.name for m in state.timeline] == [timeline.STAGING, timeline.STAGED]
    assert "staging" in timeline.durations(timeline.build(state))

    monkeypatch.setattr(staging, "check_space",
                        lambda *a, **kw: staged_store.check_space(*a[:5], statvfs=lambda _p: free(1)))
    (model / "new.json").write_text("{}")  # a new key: this node must copy
    with pytest.raises(StagingError, match="^n2: .* free, the model needs"):
        staging.stage_node(spec, topo(1), jobdir, run, local, [].append, threading.Event())
    state = jobdir.read_state(run)
    assert state is not None and state.phase is Phase.FAILED and state.reported_by == "n2"
    assert "the model needs" in state.reason


def test_the_head_stops_when_another_node_already_failed(model: Path, local: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "read_mounts", lambda: "")
    jobdir, run = JobDir(tmp_path / "job").create(), Run("42")
    spec = ServeSpec(str(model), nodes=2, stage_weights="local")
    copy = staging.copy_files

    def copy_while_a_worker_fails(*a: object, **kw: object) -> bool:
        write_state(jobdir, run, Phase.FAILED, reason="n2: no space", reported_by="n2")
        return copy(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(staging, "copy_files", copy_while_a_worker_fails)
    with pytest.raises(NodeError, match="n2 ended the run: n2: no space"):
        staging.stage_node(spec, topo(0), jobdir, run, local, [].append, threading.Event())
    assert [p for p in models_dir(local).iterdir() if not p.name.startswith(".")] == []


def test_a_worker_waits_while_the_head_is_staging(tmp_path: Path) -> None:
    jobdir, run = JobDir(tmp_path / "job").create(), Run("42")
    log: list[str] = []
    staging.wait_head_staged(jobdir, run, threading.Event(), 0.0, log.append, poll=0.01)  # no head: no wait
    write_state(jobdir, run, Phase.STARTING_RAY, marks=[Mark(name=timeline.STAGING, at=1.0)])
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (staging.wait_head_staged(jobdir, run, threading.Event(), 0.0,
                                                                       log.append, poll=0.01), done.set()))
    waiter.start()
    assert not done.wait(0.2)  # the head is visibly copying: no deadline
    write_state(jobdir, run, Phase.STARTING_RAY, marks=[Mark(name=timeline.STAGED, at=2.0)])
    assert done.wait(5)
    waiter.join()
    assert log == ["weights staged here; waiting for the head to finish its copy"]
