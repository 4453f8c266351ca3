"""Warm restarts and weights on network filesystems: cache keying and folders, the mount table
read by longest mount point, and when ``--safetensors-load-strategy prefetch`` is passed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from slurm_vllm import vllm_args
from slurm_vllm.jobdir import cache_root
from slurm_vllm.node import warm
from slurm_vllm.spec import ServeSpec
from slurm_vllm.vllm_args import VllmInstall

MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
nas:/export/home /home nfs4 rw,vers=4.2 0 0
/dev/sdb1 /home/alice/local ext4 rw 0 0
10.0.0.1@o2ib:/lfs /lustre lustre rw,flock 0 0
gpfs0 /gpfs gpfs rw 0 0
beegfs_nodev /mnt/beegfs beegfs rw 0 0
10.0.0.9:6789:/ /ceph ceph rw,name=alice 0 0
ceph-fuse /cephfuse fuse.ceph-fuse rw 0 0
nas:/models /shared\\040models nfs rw 0 0
/dev/sdc1 /scratch ext4 rw 0 0
nas:/scratch /scratch nfs rw 0 0
"""


def prefetching_vllm(tmp_path: Path, with_prefetch: bool = True) -> VllmInstall:
    """A vLLM package folder whose sources say what it supports (never imported)."""
    pkg = tmp_path / "vllm"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "config").mkdir()
    (pkg / "engine" / "arg_utils.py").write_text('load_group.add_argument("--safetensors-load-strategy", **kw)\n')
    values = '"lazy", "eager", "prefetch"' if with_prefetch else '"lazy", "eager"'
    (pkg / "config" / "load.py").write_text(f"SafetensorsLoadStrategy = Literal[{values}]\n")
    return VllmInstall("0.12.0", pkg)


# --------------------------------------------------------------------------------------------
# compile caches
# --------------------------------------------------------------------------------------------


def test_the_cache_key_is_the_vllm_version_made_safe() -> None:
    assert warm.cache_key("0.11.0") == "vllm-0.11.0"
    assert warm.cache_key("0.32.0+cpu") == "vllm-0.32.0+cpu"
    assert warm.cache_key("1.0/../x y") == "vllm-1.0_.._x_y"


def test_each_vllm_version_gets_its_own_folders() -> None:
    a, _ = warm.cache_env(Path("/c"), "0.11.0", {})
    b, _ = warm.cache_env(Path("/c"), "0.12.0", {})
    assert a == {"VLLM_CACHE_ROOT": "/c/vllm-0.11.0/vllm", "TORCHINDUCTOR_CACHE_DIR": "/c/vllm-0.11.0/inductor",
                 "TRITON_CACHE_DIR": "/c/vllm-0.11.0/triton"}
    assert not set(a.values()) & set(b.values())


def test_a_value_the_environment_sets_is_kept() -> None:
    add, kept = warm.cache_env(Path("/c"), "0.11.0", {"TRITON_CACHE_DIR": "/mine", "VLLM_CACHE_ROOT": ""})
    assert kept == ["TRITON_CACHE_DIR"] and "TRITON_CACHE_DIR" not in add and "VLLM_CACHE_ROOT" in add


def test_no_caches_without_a_folder_or_a_version() -> None:
    assert warm.cache_env(None, "0.11.0", {}) == ({}, [])
    assert warm.cache_env(Path("/c"), None, {}) == ({}, [])


def test_cache_dir_none_default_and_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLURM_VLLM_HOME", str(tmp_path / "h"))
    assert cache_root(None) == tmp_path / "h" / "cache"  # beside the jobs root, h/jobs
    assert cache_root("none") is None and cache_root("None") is None
    assert cache_root("/scratch/c") == Path("/scratch/c")


def test_prepare_caches_makes_private_folders_and_tolerates_a_second_job(tmp_path: Path) -> None:
    logs: list[str] = []
    root = tmp_path / "cache"
    env = warm.prepare_caches(str(root), VllmInstall("0.11.0", None), {}, logs.append)
    for value in env.values():
        assert Path(value).is_dir() and stat.S_IMODE(Path(value).stat().st_mode) == 0o700
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert warm.prepare_caches(str(root), VllmInstall("0.11.0", None), {}, logs.append) == env  # exist_ok
    assert str(root / "vllm-0.11.0") in logs[0]


def test_an_existing_cache_folder_keeps_its_mode(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o750)
    root.chmod(0o750)
    warm.prepare_caches(str(root), VllmInstall("0.11.0", None), {}, lambda _m: None)
    assert stat.S_IMODE(root.stat().st_mode) == 0o750


def test_prepare_caches_says_why_it_sets_nothing(tmp_path: Path) -> None:
    logs: list[str] = []
    assert warm.prepare_caches(str(tmp_path), VllmInstall(None, None), {}, logs.append) == {}
    assert "version is unknown" in logs[0]
    assert warm.prepare_caches("none", VllmInstall("1", None), {}, logs.append) == {}
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert warm.prepare_caches(str(blocked / "cache"), VllmInstall("1", None), {}, logs.append) == {}
    assert "cannot create" in logs[-1]


# --------------------------------------------------------------------------------------------
# the mount table
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "fstype"), [
    ("/home/alice/models/llama", "nfs4"),
    ("/home/alice/local/llama", "ext4"),       # the longest mount point wins
    ("/home", "nfs4"),
    ("/homeless/x", "ext4"),                   # a name prefix is not a parent
    ("/lustre/proj/m", "lustre"),
    ("/gpfs/m", "gpfs"),
    ("/mnt/beegfs/m", "beegfs"),
    ("/ceph/m", "ceph"),
    ("/cephfuse/m", "fuse.ceph-fuse"),
    ("/shared models/llama", "nfs"),           # \040 is a space in /proc/mounts
    ("/scratch/m", "nfs"),                     # the later mount over the same point
    ("/dev/shm/m", "tmpfs"),
])
def test_mount_type_by_longest_mount_point(path: str, fstype: str) -> None:
    assert warm.mount_type(path, MOUNTS) == fstype


def test_mount_type_without_a_table() -> None:
    assert warm.mount_type("/x", "") is None
    assert warm.mount_type("/x", "garbage\n") is None


# --------------------------------------------------------------------------------------------
# the load strategy rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["/home/alice/m", "/lustre/m", "/gpfs/m", "/mnt/beegfs/m", "/ceph/m", "/cephfuse/m"])
def test_prefetch_for_a_local_model_on_a_network_filesystem(tmp_path: Path, model: str) -> None:
    strategy, why = warm.load_strategy(model, [], prefetching_vllm(tmp_path), MOUNTS)
    assert strategy == "prefetch" and "--safetensors-load-strategy prefetch" in why


@pytest.mark.parametrize("model", ["/home/alice/local/m", "/dev/shm/m", "org/model"])
def test_nothing_for_local_disks_and_hub_models(tmp_path: Path, model: str) -> None:
    assert warm.load_strategy(model, [], prefetching_vllm(tmp_path), MOUNTS) == (None, "")


@pytest.mark.parametrize("args", [["--safetensors-load-strategy", "lazy"], ["--safetensors_load_strategy=eager"],
                                  ["--safetensors-load", "lazy"]])
def test_the_users_choice_wins(tmp_path: Path, args: list[str]) -> None:
    assert warm.load_strategy("/lustre/m", args, prefetching_vllm(tmp_path), MOUNTS) == (None, "")


def test_a_vllm_without_prefetch_gets_nothing_and_the_log_says_so(tmp_path: Path) -> None:
    strategy, why = warm.load_strategy("/lustre/m", [], prefetching_vllm(tmp_path, with_prefetch=False), MOUNTS)
    assert strategy is None and "lustre" in why and "has no" in why
    strategy, _ = warm.load_strategy("/lustre/m", [], VllmInstall(None, None), MOUNTS)
    assert strategy is None


def test_the_flag_goes_before_the_users_args() -> None:
    spec = ServeSpec("org/M", extra_args=["--max-model-len", "4096"])
    argv = vllm_args.build_serve_argv(spec, host="h", port=1, load_strategy="prefetch")
    assert argv[-4:] == ["--safetensors-load-strategy", "prefetch", "--max-model-len", "4096"]
    mine = ServeSpec("org/M", extra_args=["--safetensors-load-strategy=lazy"])
    argv = vllm_args.build_serve_argv(mine, host="h", port=1, load_strategy="prefetch")
    assert argv.count("--safetensors-load-strategy=lazy") == 1 and "prefetch" not in argv


def test_user_sets_reads_flags_as_vllm_does() -> None:
    flag = "--safetensors-load-strategy"
    assert vllm_args.user_sets(["--safetensors_load_strategy", "x"], flag)
    assert vllm_args.user_sets(["--safetensors-load-strategy=x"], flag)
    assert not vllm_args.user_sets(["--max-model-len", "--safetensors-load-strategy-x"], flag)
    assert not vllm_args.user_sets(["-s", "--"], flag)


def test_the_installed_vllm_is_found_without_importing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("raise SystemExit('imported')\n")
    dist = site / "vllm-9.8.7.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.8.7\n")
    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()
    vllm_args.installed_vllm.cache_clear()
    try:
        found = vllm_args.installed_vllm(("vllm",))
    finally:
        vllm_args.installed_vllm.cache_clear()
    assert found.version == "9.8.7" and found.package_dir == site / "vllm"


def test_else_the_vllm_of_the_commands_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the node program's own Python lacks vLLM, the ``#!`` line of ``vllm`` decides."""
    import sys

    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("raise SystemExit('imported')\n")
    dist = site / "vllm-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 1.2.3\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    vllm = tmp_path / "vllm-cmd"
    vllm.write_text(f"#!{python}\n")
    monkeypatch.setattr(vllm_args, "_this_python_vllm", lambda: None)
    vllm_args.installed_vllm.cache_clear()
    try:
        assert vllm_args.installed_vllm((str(vllm),)) == VllmInstall("1.2.3", site / "vllm")
        assert vllm_args.installed_vllm((str(tmp_path / "missing"),)) == VllmInstall(None, None)
    finally:
        vllm_args.installed_vllm.cache_clear()
