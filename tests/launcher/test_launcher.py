"""What the launcher says while a start is in progress."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from facade.config import build_parser as facade_parser
from launcher.__main__ import services_settings, start_phase
from router.config import build_parser as router_parser
from shard.config import build_parser as shard_parser


def test_the_start_phase_follows_the_services_sockets(tmp_path):
    phase = start_phase(str(tmp_path), num_shard=2)
    assert phase() == "loading the model (0/2 shards up)"
    (tmp_path / "shard-0").touch()
    assert phase() == "loading the model (1/2 shards up)"
    (tmp_path / "shard-1").touch()
    assert phase() == "starting the router and the HTTP facade"


@pytest.mark.parametrize("build", [shard_parser, router_parser, facade_parser])
def test_every_service_flag_names_its_environment_variable(build):
    for action in build({})._actions:
        if action.option_strings and action.dest != "help":
            assert re.search(r"\[[A-Z_]", action.help or ""), action.option_strings


def test_launcher_help_lists_every_documented_setting():
    """``python -m launcher --help`` shows every variable of the README's settings table."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("| variable | meaning | default |") :]
    table = table[: table.index("\n\n")]
    names = {n for line in table.splitlines()[2:] for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])}
    shown = services_settings({})
    assert sorted(n for n in names if n not in shown) == []
