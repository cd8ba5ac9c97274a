"""The one settings table: every row reaches its services' parsers from its environment names."""

from __future__ import annotations

import pytest

from common.settings import SETTINGS, Setting, parser_for

SAMPLES = {str: "x", int: "7", float: "0.5", bool: "0"}


def _sample(s: Setting) -> str:
    return s.choices[-1] if s.choices else SAMPLES[s.kind]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s.flag}:{s.env[0]}")
def test_each_environment_name_sets_its_flag_in_every_service_that_reads_it(setting):
    for service in setting.services:
        for name in setting.env:
            value = parser_for(service, {name: _sample(setting)}, "").parse_args([])
            expected = False if setting.kind is bool else setting.kind(_sample(setting))
            assert getattr(value, setting.dest) == expected, (service, name)


def test_a_flag_wins_over_the_environment():
    args = parser_for("router", {"MAX_BATCH_SIZE": "8"}, "").parse_args(["--max-batch-size", "16"])
    assert args.max_batch_size == 16


def test_a_malformed_value_stops_the_start_naming_the_variable():
    with pytest.raises(SystemExit, match="MAX_BATCH_SIZE must be int"):
        parser_for("router", {"MAX_BATCH_SIZE": "many"}, "")


def test_flags_are_unique_per_service():
    for service in ("shard", "router", "facade", "launcher"):
        flags = [s.flag for s in SETTINGS if service in s.services]
        assert len(flags) == len(set(flags)), service
