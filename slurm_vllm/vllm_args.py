"""vLLM's command line, owned in one place: the flags the tool sets itself (and the fix each
refusal names), how vLLM's own parser reads an argument, the ``vllm serve`` argv, and the
``vllm`` executable. The spec's rules and the node program both use it."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurm_vllm.errors import SpecError, SpecErrors

if TYPE_CHECKING:
    from slurm_vllm.spec import ServeSpec

#: vLLM flags the node program sets itself. Value: the spec field that decides it, or None when
#: the tool alone decides it (then the flag is always refused in extra_args).
OWNED_VLLM_FLAGS: dict[str, str | None] = {
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--pipeline-parallel-size": "pipeline_parallel_size",
    "-pp": "pipeline_parallel_size",
    "--distributed-executor-backend": "backend",
    "--port": "port",
    "--served-model-name": "served_name",
    "--host": None,
    "--api-key": None,
    "--nnodes": None,
    "--node-rank": None,
    "--master-addr": None,
    "--master-port": None,
    "--headless": None,
    "-n": None,
    "-r": None,
    "--model": None,
    "--config": None,
}

OWNED_FIX = {
    "--host": "remove it: the head binds the address on which the other nodes reach it",
    "--api-key": "remove it: a key is generated per job (set api_key / --no-api-key instead)",
    "--nnodes": "remove it: set nodes (the node program passes --nnodes for the mp backend)",
    "--node-rank": "remove it: each node's rank comes from Slurm",
    "--master-addr": "remove it: the head's address comes from Slurm",
    "--master-port": "remove it: the port is planned per job",
    "--headless": "remove it: non-zero ranks run headless on their own with the mp backend",
    "--model": "remove it: set model (the positional MODEL)",
    "--config": "remove it and pass the options themselves: a vLLM config file could set the flags "
                "the tool owns (the API key among them)",
    "-n": "remove it: set nodes (the node program passes --nnodes for the mp backend)",
    "-r": "remove it: each node's rank comes from Slurm",
}


def _vllm_flag(arg: str) -> tuple[str, str | None]:
    """Split ``--flag=value`` and name the flag as vLLM's parser does: ``--flag_name`` is
    ``--flag-name``, and ``--flag.key=v`` / ``--flag+=v`` (its JSON and list forms) set ``--flag``."""
    name, eq, value = arg.partition("=")
    if name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
        name = name.split(".", 1)[0].rstrip("+")
    return name, (value if eq else None)


def owned_flag(arg: str) -> tuple[str, str | None] | None:
    """The tool-owned vLLM flag ``arg`` would set, read as vLLM's argparse reads it, and the value
    it carries; None when it sets none of them.

    argparse accepts any unambiguous prefix of a long option (``--api-k`` is ``--api-key``) and
    a short option glued to its value (``-n2``). A prefix of an owned flag is refused even when
    vLLM would find it ambiguous: it is never needed, and the flag can be written in full.
    """
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    name, value = _vllm_flag(arg)
    if name in OWNED_VLLM_FLAGS:
        return name, value
    if name.startswith("--"):
        if len(name) > 2:
            prefixed = [flag for flag in OWNED_VLLM_FLAGS if flag.startswith("--") and flag.startswith(name)]
            if prefixed:
                return min(prefixed, key=len), value
        return None
    # A single dash: "-t" abbreviates "-tp"; "-n2" is "-n 2".
    prefixed = [flag for flag in OWNED_VLLM_FLAGS if not flag.startswith("--") and flag.startswith(name)]
    if prefixed and len(name) > 1:
        return min(prefixed, key=len), value
    glued = name[:2]
    if glued in OWNED_VLLM_FLAGS and len(name) > 2:
        return glued, name[2:] if value is None else f"{name[2:]}={value}"
    return None


def check_extra_args(spec: ServeSpec) -> list[SpecError]:
    """Refuse extra vLLM args that the node program passes itself.

    They are refused even when they repeat the spec's value: the node program builds these flags
    from the spec and refuses duplicates at start, so letting one through here would only move
    the failure into the job.
    """
    errors: list[SpecError] = []
    args = spec.model.extra_args
    decided: dict[str, Any] = {
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "backend": spec.backend, "port": spec.serve.port, "served_name": spec.model.served_name,
    }
    i = 0
    while i < len(args):
        found = owned_flag(args[i])
        field = f"extra_args[{i}]"
        if found is not None:
            name, value = found
            given, shown_arg = args[i].partition("=")[0], args[i]
            if value is None and name != "--headless" and i + 1 < len(args):
                shown_arg = f"{args[i]} {args[i + 1]}"
                i += 1
            spelled = "" if _vllm_flag(given)[0] == name else f" (vLLM reads {given} as {name})"
            owner = OWNED_VLLM_FLAGS[name]
            if owner is None:
                errors.append(SpecError(field, shown_arg, OWNED_FIX[name] + spelled, problem="is set by the tool"))
            else:
                now = decided[owner]
                errors.append(SpecError(
                    field, shown_arg,
                    f"remove it and set {owner} instead (now {now if now is not None else 'unset'}); "
                    f"the node program passes {name} itself{spelled}", problem="is set by the tool"))
        i += 1
    return errors


def vllm_executable(env: Mapping[str, str] | None = None) -> list[str]:
    """The ``vllm`` command: from PATH (the job's venv/container), else next to this Python."""
    path = (env or os.environ).get("PATH")
    found = shutil.which("vllm", path=path)
    if found:
        return [found]
    beside = Path(sys.executable).with_name("vllm")
    if beside.exists():
        return [str(beside)]
    return ["vllm"]


def user_sets(args: Sequence[str], flag: str) -> bool:
    """Whether the user's vLLM ``args`` set ``flag``, read as vLLM's parser reads them: any
    spelling (``--flag_name``, ``--flag=v``) and any prefix argparse would expand to it. A
    prefix counts even if vLLM might find it ambiguous: the tool then adds nothing, which is
    the safe side."""
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        name = _vllm_flag(arg)[0]
        if name == flag or (len(name) > 2 and flag.startswith(name)):
            return True
    return False


def build_serve_argv(
    spec: ServeSpec,
    *,
    host: str,
    port: int,
    backend: str | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    executable: Sequence[str] = ("vllm",),
    shutdown_timeout: int | None = None,
    load_strategy: str | None = None,
    extra_flags: Sequence[str] = (),
    model_path: str | None = None,
) -> list[str]:
    """The ``vllm serve`` argv for one node; no secret appears in it.

    ``backend`` ``ray``: one command on the head. ``mp``: one command per node, ranks other
    than 0 headless (they serve no API; rank 0 does). ``local``: one node on its own (a replica),
    vLLM's default executor. ``shutdown_timeout``: how long vLLM lets
    in-flight requests finish after SIGTERM (``--shutdown-timeout``), unless the user set it.
    ``load_strategy``: ``--safetensors-load-strategy``, unless the user set it. ``extra_flags``:
    switches the node adds (e.g. ``--enable-scale-out`` for a replica), each unless the user set it.
    ``model_path``: what vLLM loads instead of the spec's model (a node's staged copy); clients
    keep the spec's name: it is passed as ``--served-model-name`` unless ``served_name`` is set
    (``--served-model-name`` in the extra args is refused, so ``served_name`` is the one way).
    """
    backend = backend or spec.backend
    errors = check_extra_args(spec)
    if errors:  # the spec refuses them first; this guards specs edited after validation
        raise SpecErrors(errors)
    tp, pp = spec.tensor_parallel_size, spec.pipeline_parallel_size
    model = model_path or spec.model.name
    argv = [*executable, "serve", model]
    argv += ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
    if backend == "ray":
        argv += ["--distributed-executor-backend", "ray"]
    elif backend == "mp":
        if master_addr is None or master_port is None:
            raise ValueError("the mp backend needs master_addr and master_port")
        argv += [
            "--nnodes", str(nnodes),
            "--node-rank", str(node_rank),
            "--master-addr", master_addr,
            "--master-port", str(master_port),
        ]
        if node_rank != 0:
            argv.append("--headless")
    elif backend != "local":
        raise ValueError(f"unknown backend {backend!r}")
    if backend in ("ray", "local") or node_rank == 0:
        argv += ["--host", host, "--port", str(port)]
        served = spec.model.served_name or (spec.model.name if model != spec.model.name else None)
        if served:
            argv += ["--served-model-name", served]
    user_args = list(spec.model.extra_args)
    if shutdown_timeout and not any(_vllm_flag(a)[0] == "--shutdown-timeout" for a in user_args):
        argv += ["--shutdown-timeout", str(shutdown_timeout)]
    if load_strategy and not user_sets(user_args, LOAD_STRATEGY_FLAG):
        argv += [LOAD_STRATEGY_FLAG, load_strategy]
    argv += [flag for flag in extra_flags if not user_sets(user_args, flag)]
    argv += user_args
    return argv


#: vLLM's option for how safetensors weights are read (``prefetch``: into the page cache first).
LOAD_STRATEGY_FLAG = "--safetensors-load-strategy"


@dataclass(frozen=True)
class VllmInstall:
    """The vLLM a node runs: its version and package folder (None where not found)."""

    version: str | None
    package_dir: Path | None

    def source_has(self, text: str, *files: str) -> bool:
        """Whether any of ``files`` (relative to the package) holds ``text``; read, never imported."""
        if self.package_dir is None:
            return False
        for rel in files:
            try:
                if text in (self.package_dir / rel).read_text(errors="replace"):
                    return True
            except OSError:
                continue
        return False

    @property
    def has_prefetch_load(self) -> bool:
        """``--safetensors-load-strategy prefetch`` exists: the option (engine/arg_utils.py) and its
        ``prefetch`` value (the load config; older vLLMs had the option with lazy/eager only)."""
        return self.source_has(f'"{LOAD_STRATEGY_FLAG}"', "engine/arg_utils.py") and self.source_has(
            '"prefetch"', "config/load.py", "config/__init__.py", "config.py", "engine/arg_utils.py")


    @property
    def has_scale_out(self) -> bool:
        """``--enable-scale-out`` exists: vLLM's ``/v1/completions/render`` and friends, which
        vllm-router's cache-aware policy calls to tokenize (without them it gets 403 and
        routes every request to one replica)."""
        return self.source_has("enable_scale_out", "entrypoints/launchers/cli_args.py",
                               "entrypoints/openai/cli_args.py")


#: The switch that serves vLLM's render endpoints (what vllm-router's policies tokenize with).
SCALE_OUT_FLAG = "--enable-scale-out"


def _this_python_vllm() -> VllmInstall | None:
    """vLLM as this interpreter's packages have it (importlib.metadata; nothing imported)."""
    try:
        version = importlib.metadata.version("vllm")
        spec = importlib.util.find_spec("vllm")
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return VllmInstall(version, Path(locations[0]) if locations else None)


def _script_python_vllm(executable: Sequence[str]) -> VllmInstall | None:
    """vLLM as the interpreter on the command's ``#!`` line has it (when the node program's own
    Python lacks it), asked in one short subprocess that imports nothing of vLLM."""
    try:
        with open(executable[0], "rb") as f:
            first = f.readline(512).decode(errors="replace")
    except (OSError, IndexError):
        return None
    if not first.startswith("#!"):
        return None
    code = ("import importlib.metadata as m, importlib.util as u, json; s = u.find_spec('vllm'); "
            "d = list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else ''; "
            "print(json.dumps([next((x.version for x in m.distributions(name='vllm')), '') if d else '', d]))")
    try:
        out = subprocess.run([*first[2:].split(), "-c", code], capture_output=True, text=True, timeout=30,
                             check=False).stdout.strip()
        version, folder = json.loads(out or '["", ""]')
    except (OSError, subprocess.SubprocessError, ValueError, TypeError):
        return None
    return VllmInstall(str(version) or None, Path(folder) if folder else None) if folder else None


@functools.lru_cache(maxsize=8)
def installed_vllm(executable: tuple[str, ...]) -> VllmInstall:
    """The vLLM the node runs, looked up once per node program (the answer does not change while
    it runs): this Python's packages first (importlib.metadata), else the command's interpreter."""
    return _this_python_vllm() or _script_python_vllm(executable) or VllmInstall(None, None)


def vllm_drains_on_sigterm(executable: Sequence[str]) -> bool:
    """Whether the vLLM that ``executable`` runs has ``--shutdown-timeout`` (drain on SIGTERM).

    Read from that vLLM's own source, found through the interpreter on the command's ``#!``
    line, without importing vLLM (seconds, and the GPU libraries). Unknown (not a Python
    script, nothing found) is False: no flag is passed that the installed vLLM might refuse.
    """
    found = _script_python_vllm(executable)
    return found is not None and found.source_has('"--shutdown-timeout"', "engine/arg_utils.py")
