"""The one quoting helper, checked against the real readers: bash, and sbatch's #SBATCH rules."""

from __future__ import annotations

import subprocess

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurm_vllm import shell
from slurm_vllm.render import Quoted, UnquotedValueError, make_environment
from tests.unit.script_checks import sbatch_parse_line

# One line of text: anything but newline, carriage return, NUL (refused) and lone surrogates
# (not encodable, so never in a real argv).
line_text = st.text(
    # Control characters (a tab aside) are refused outright; see the tests of that below.
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")),
    max_size=40,
)


def bash_words(quoted_words: list[str]) -> list[str]:
    """What bash reads back from the quoted words, one element per word."""
    script = "printf '%s\\0' " + " ".join(quoted_words)
    out = subprocess.run(["bash", "-c", script], capture_output=True, timeout=10,
                         env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert out.returncode == 0, out.stderr
    parts = out.stdout.split(b"\0")
    assert parts[-1] == b""
    return [p.decode("utf-8") for p in parts[:-1]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line_text.filter(lambda s: s != ""), min_size=1, max_size=6))
def test_quote_round_trips_through_bash(values: list[str]) -> None:
    assert bash_words([shell.quote(v) for v in values]) == values


@settings(max_examples=50, deadline=None)
@given(st.lists(line_text, min_size=1, max_size=6))
def test_join_round_trips_through_bash(values: list[str]) -> None:
    # join is quote per element: even empty strings stay separate words
    assert bash_words([shell.join(values)]) == values


def test_quote_keeps_hostile_text_inert(tmp_path):
    canary = tmp_path / "canary"
    value = f"$(touch {canary}) `touch {canary}` ; touch {canary} 'q' \"d\" \\ é"
    assert bash_words([shell.quote(value)]) == [value]
    assert not canary.exists()


@pytest.mark.parametrize("bad,what", [("a\nb", "newline"), ("a\rb", "newline"), ("a\x00b", "NUL"),
                                      ("a\x1fb", "control character 0x1f"), ("a\x1b[2Jb", "control character 0x1b"),
                                      ("a\x7fb", "control character 0x7f")])
def test_quote_refuses_line_breaks_nul_and_control_characters(bad, what):
    with pytest.raises(shell.UnsafeValueError, match=f"holds a {what}"):
        shell.quote(bad)
    with pytest.raises(shell.UnsafeValueError):
        shell.sbatch_value(bad)


def test_a_tab_is_quoted_not_refused():
    assert bash_words([shell.quote("a\tb")]) == ["a\tb"]


@settings(max_examples=300, deadline=None)
@given(line_text.filter(lambda s: "hetjob" not in s.lower() and "packjob" not in s.lower()))
def test_sbatch_value_round_trips_through_sbatch_rules(value: str) -> None:
    line = "#SBATCH --job-name=" + shell.sbatch_value(value)
    assert sbatch_parse_line(line) == ["--job-name=" + value]


def test_sbatch_value_quotes_specials():
    assert shell.sbatch_value("plain-name_1.2") == "plain-name_1.2"
    assert shell.sbatch_value("a b") == '"a b"'
    assert shell.sbatch_value("x#y") == '"x#y"'
    assert shell.sbatch_value("") == '""'
    assert shell.sbatch_value("it's \"q\" \\") == '"it\'s \\"q\\" \\\\"'


def test_sbatch_value_refuses_hetjob_words():
    with pytest.raises(shell.UnsafeValueError, match="job separator"):
        shell.sbatch_value("my-hetjob")


def test_slurm_filename_escapes_percent():
    assert shell.slurm_filename("/a/100%/b") == "/a/100%%/b"


# --- the template environment refuses unquoted values --------------------------------------


def render(source: str, **ctx: object) -> str:
    return make_environment().from_string(source).render(ctx)


def test_unfiltered_string_fails_the_render():
    with pytest.raises(UnquotedValueError, match="without a quoting filter"):
        render("echo {{ x }}", x="$(reboot)")


def test_slurm_file_alone_is_not_enough():
    with pytest.raises(UnquotedValueError):
        render("#SBATCH --output={{ x | slurm_file }}", x="/a b/%j")
    assert render("#SBATCH --output={{ x | slurm_file | sbatch }}", x="/a b/c%") == \
        '#SBATCH --output="/a b/c%%"'


def test_concatenation_loses_the_mark():
    with pytest.raises(UnquotedValueError):
        render("{{ (x | q) ~ ' rm -rf /' }}", x="a")


def test_undefined_name_fails_the_render():
    with pytest.raises(jinja2.UndefinedError):
        render("{{ missing | q }}")


def test_filters_quote_and_numbers_pass():
    assert render("echo {{ x | q }} {{ n }}", x="a b", n=3) == "echo 'a b' 3"
    assert isinstance(make_environment().filters["q"]("x"), Quoted)


def test_booleans_and_floats_need_a_filter():
    with pytest.raises(UnquotedValueError):
        render("{{ b }}", b=True)
    with pytest.raises(UnquotedValueError):
        render("{{ f }}", f=1.5)
