"""The test tiers: ``tests/unit`` (no Slurm), ``tests/lab`` (the real Slurm lab, see
tests/lab/lab.py). Everything under tests/lab is marked ``lab``; the test that takes the lab
down and up again always runs last."""

from __future__ import annotations

from pathlib import Path

import pytest

LAB_DIR = Path(__file__).resolve().parent / "lab"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of the test that takes the lab down (it must run last)."""
    config.addinivalue_line("markers", "lab_teardown: takes the lab down and up again; always ordered last")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/lab as ``lab``; move ``lab_teardown`` tests to the end."""
    for item in items:
        if LAB_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)
    items.sort(key=lambda item: item.get_closest_marker("lab_teardown") is not None)
