"""Shared by the tests of slurm.py, job.py and cli.py: a stand-in for Slurm at the runner boundary."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from slurm_vllm import slurm

FIXTURES = Path(__file__).parent / "fixtures"

Answer = slurm.Completed | Exception | Callable[[list[str]], slurm.Completed]


def fixture(name: str) -> str:
    """A recorded Slurm output; ``\\x1f`` is stored as the visible ``<US>`` for readability."""
    return (FIXTURES / name).read_text().replace("<US>", slurm.SEP)


def ok(argv: list[str], stdout: str = "", stderr: str = "") -> slurm.Completed:
    return slurm.Completed(argv, 0, stdout, stderr)


def fail(argv: list[str], stderr: str, code: int = 1) -> slurm.Completed:
    return slurm.Completed(argv, code, "", stderr)


class FakeSlurm:
    """Answers per command name (sbatch, squeue, sacct, scancel); a list is consumed in order."""

    def __init__(self, **answers: Answer | list[Answer]) -> None:
        self.answers = {k: (list(v) if isinstance(v, list) else v) for k, v in answers.items()}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], timeout: float) -> slurm.Completed:
        assert timeout and timeout > 0, "every Slurm call must have a timeout"
        self.calls.append(list(argv))
        answer = self.answers.get(argv[0])
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if answer is None:
            raise AssertionError(f"unexpected Slurm call {argv}")
        if isinstance(answer, Exception):
            raise answer
        if callable(answer) and not isinstance(answer, slurm.Completed):
            return answer(argv)
        return slurm.Completed(argv, answer.returncode, answer.stdout, answer.stderr)

    def count(self, command: str) -> int:
        return sum(1 for c in self.calls if c[0] == command)


def timeout_exc(argv: list[str]) -> subprocess.TimeoutExpired:
    return subprocess.TimeoutExpired(argv, 30)
