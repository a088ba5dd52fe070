"""The load test's options are defined once (loadtest/options.py): Locust's parser, the run
state, run_profile's command lines and the README's table all come from that table; and what a
quitter's close accepts (loadtest/quits.py) follows --strict-quits."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from loadtest import quits
from loadtest.accounting import BEFORE_STREAMING, SUCCESS, WHILE_STREAMING
from loadtest.options import Options, add_arguments, as_argv, markdown_table
from loadtest.run_profile import PROFILES
from loadtest.run_state import RUN

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return Options.from_namespace(parser.parse_args(argv))


def test_the_parser_defaults_are_the_tables() -> None:
    assert parse([]) == Options()


def test_a_profiles_command_line_parses_back_to_its_options() -> None:
    for name, profile in PROFILES.items():
        chosen = parse(as_argv({**profile.options, "strict_quits": True}))
        for option, value in profile.options.items():
            assert getattr(chosen, option) == value, (name, option)
        assert chosen.strict_quits


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="chatter_weigth"):
        as_argv({"chatter_weigth": 3})


def test_the_readme_shows_the_option_table() -> None:
    readme = (ROOT / "loadtest" / "README.md").read_text()
    block = re.search(r"<!-- options:begin -->\n(.*?)\n<!-- options:end -->", readme, re.S)
    assert block, "loadtest/README.md has no generated option table"
    assert block.group(1) == markdown_table(), "run `python -m loadtest.options` into the README"


@pytest.fixture
def strict(request: pytest.FixtureRequest):
    saved = RUN.options
    RUN.options = Options(strict_quits=request.param)
    yield request.param
    RUN.options = saved


@pytest.mark.parametrize("strict", [False], indirect=True)
def test_a_close_accepts_every_later_outcome(strict: bool) -> None:
    assert quits.close_accepts(BEFORE_STREAMING) == (BEFORE_STREAMING, WHILE_STREAMING, SUCCESS)
    assert quits.close_accepts(WHILE_STREAMING) == (WHILE_STREAMING, SUCCESS)


@pytest.mark.parametrize("strict", [True], indirect=True)
def test_a_strict_close_accepts_what_the_client_saw(strict: bool) -> None:
    assert quits.close_accepts(BEFORE_STREAMING) == (BEFORE_STREAMING,)
    assert quits.close_accepts(WHILE_STREAMING) == (WHILE_STREAMING,)


@pytest.mark.parametrize("strict", [False, True], indirect=True)
def test_a_close_after_the_end_of_the_answer_is_ambiguous_even_when_strict(strict: bool) -> None:
    assert quits.close_accepts(WHILE_STREAMING, end_seen=True) == (SUCCESS, WHILE_STREAMING)
