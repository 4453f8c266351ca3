"""The CLI's spec flags come from the spec's fields: one place to add an option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slurm_vllm import options
from slurm_vllm.spec import FLAT_NAMES, SECTIONS, TOP_FIELDS, ServeSpec

DOCS = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def all_fields() -> dict[str, object]:
    fields = {flat: SECTIONS[s].model_fields[n] for flat, (s, n) in FLAT_NAMES.items()}
    fields.update({name: ServeSpec.model_fields[name] for name in TOP_FIELDS})
    return fields


def test_every_spec_field_has_a_flag_except_what_follows_the_double_dash():
    flagged = {field for _, field, _ in options.SPEC_FLAGS}
    assert flagged == set(all_fields()) - options.NO_FLAG
    assert {"extra_args"} == options.NO_FLAG  # the model is the positional MODEL


def test_every_spec_field_has_a_row_in_docs_spec_md():
    rows = set(re.findall(r"^\| `([a-z_]+)`", DOCS.read_text(), re.MULTILINE))
    assert set(all_fields()) - rows == set(), "fields without a row in docs/spec.md"


def test_help_comes_from_the_field_and_its_default_from_the_model():
    for flags, field, kwargs in options.SPEC_FLAGS:
        info = all_fields()[field]
        if field in options.OVERRIDES and "help" in options.OVERRIDES[field]:
            assert flags[0].startswith("--no-"), f"{field}: only a negated switch words its own help"
            continue
        assert kwargs["help"].startswith((info.description or "").rstrip(".")[:40]), field
        default = None if info.default_factory is not None else info.default
        if default not in (None, True, False, ""):  # "": none of its own (job_name comes from the model)
            assert f"(default: {default})" in kwargs["help"], field


def test_no_description_restates_a_default_by_hand():
    for field, info in all_fields().items():
        assert "(default" not in (info.description or ""), f"{field}: the default is shown from the model"


def test_overrides_name_only_real_fields():
    assert set(options.OVERRIDES) <= set(all_fields())


def test_an_optional_choice_field_offers_its_choices() -> None:
    from slurm_vllm.cli import build_parser

    p = build_parser("submit")
    args = p.parse_args(["submit", "org/m", "--router-policy", "round_robin"])
    assert args.router_policy == "round_robin"
    with pytest.raises(SystemExit):
        p.parse_args(["submit", "org/m", "--router-policy", "fastest"])


def test_the_flag_table_is_the_one_the_spec_fields_generate() -> None:
    """``submit --help`` reads the generated table (no pydantic); it must say what the fields say."""
    table = Path(options.__file__).with_name("_flag_table.py").read_text()
    assert table == options.flag_table_text(), "spec fields changed: run python -m slurm_vllm.options"
    from slurm_vllm._flag_table import FLAGS

    assert [(f, n) for f, n, _ in FLAGS] == [(f, n) for f, n, _ in options.SPEC_FLAGS]
