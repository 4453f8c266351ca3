"""What the cluster offers, as Slurm reports it: partitions and their nodes' shapes (``sinfo``),
and this user's accounts and QOS (``sacctmgr``), for ``doctor``.

Both go through the one runner (:func:`slurm_vllm.slurm.run`); the parsers are pure functions of
Slurm's text. ``sinfo --exact`` groups only nodes whose CPUs, memory and GRES are identical, so
each row is one node shape in one partition and state, with a count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slurm_vllm import slurm
from slurm_vllm.slurm import SEP

#: sinfo format codes, in the order :func:`parse_sinfo` reads them: partition (``*`` marks the
#: default), its availability, node count, CPUs per node, memory per node (MB), GRES, node state.
SINFO_CODES = ("%P", "%a", "%D", "%c", "%m", "%G", "%t")
#: Node states (sinfo's compact form) in which a node takes no new job.
UNUSABLE_STATES = frozenset({"down", "drain", "drng", "fail", "failg", "maint", "unk", "inval", "futr",
                             "npc", "plnd", "pow_dn", "powered_down", "powering_down"})


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one partition with one shape and one state."""

    partition: str
    default: bool  #: the cluster's default partition
    available: str  #: the partition's state: up, down, drain, inact
    count: int
    cpus: int | None
    memory_mb: int | None
    gres: str
    state: str

    @property
    def gpus(self) -> int:
        return gpus_in(self.gres)

    @property
    def usable(self) -> bool:
        """Takes new jobs now: not down, drained or failing, and responding (no ``*``)."""
        return not self.state.endswith("*") and self.state.rstrip("~#!%$@^-+") not in UNUSABLE_STATES


def sinfo_argv() -> list[str]:
    return ["sinfo", "--noheader", "--exact", "--format=" + SEP.join(SINFO_CODES)]


def _int(text: str) -> int | None:
    match = re.match(r"^\d+", text.strip())
    return int(match.group()) if match else None


def parse_sinfo(text: str) -> list[NodeGroup]:
    """Rows of :func:`sinfo_argv`'s output; lines in another format are skipped."""
    groups = []
    for line in text.splitlines():
        parts = line.split(SEP)
        if len(parts) != len(SINFO_CODES):
            continue
        part, avail, count, cpus, mem, gres, state = (p.strip() for p in parts)
        groups.append(NodeGroup(
            partition=part.rstrip("*"), default=part.endswith("*"), available=avail,
            count=_int(count) or 0, cpus=_int(cpus), memory_mb=_int(mem),
            gres="" if gres == "(null)" else gres, state=state.lower()))
    return groups


def gpus_in(gres: str) -> int:
    """GPUs per node in a GRES string: ``gpu:8``, ``gpu:a100:4(S:0-1),gpu:v100:2``, ``(null)``."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = item.strip().split(":")
        if fields[0] != "gpu":
            continue
        count = _int(fields[-1]) if len(fields) > 1 else 1
        total += 1 if count is None else count
    return total


def node_groups(timeout: float = slurm.DEFAULT_TIMEOUT) -> list[NodeGroup]:
    """Every partition's node shapes: one ``sinfo`` call. Raises SlurmCommandError."""
    return parse_sinfo(slurm.run(sinfo_argv(), timeout=timeout).stdout)


_SIZE = re.compile(r"^(\d+)([KMGTkmgt]?)$")
_MB_PER = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


def memory_mb(size: str) -> int | None:
    """A Slurm memory size (``64G``; no suffix: megabytes) in megabytes; None when malformed."""
    match = _SIZE.match(size.strip())
    if match is None:
        return None
    return int(int(match.group(1)) * _MB_PER[match.group(2).lower()])


@dataclass(frozen=True)
class Association:
    """One of this user's associations: an account, the partition it is for ("" = any), its QOS."""

    account: str
    partition: str
    qos: tuple[str, ...]


def sacctmgr_argv(user: str) -> list[str]:
    return ["sacctmgr", "--noheader", "--parsable2", "show", "associations", f"user={user}",
            "format=Account,Partition,QOS"]


def parse_associations(text: str) -> list[Association]:
    """Rows of :func:`sacctmgr_argv`'s output (``account|partition|qos1,qos2``)."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[0]:
            continue
        account, partition, qos = parts
        out.append(Association(account, partition, tuple(q for q in qos.split(",") if q)))
    return out


def associations(user: str, timeout: float = slurm.DEFAULT_TIMEOUT) -> list[Association]:
    """This user's associations: one ``sacctmgr`` call. Raises SlurmCommandError (127: absent)."""
    return parse_associations(slurm.run(sacctmgr_argv(user), timeout=timeout).stdout)
