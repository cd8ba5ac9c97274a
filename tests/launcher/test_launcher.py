"""What the launcher says while a start is in progress."""

from __future__ import annotations

from launcher.__main__ import start_phase


def test_the_start_phase_follows_the_services_sockets(tmp_path):
    phase = start_phase(str(tmp_path), num_shard=2)
    assert phase() == "loading the model (0/2 shards up)"
    (tmp_path / "shard-0").touch()
    assert phase() == "loading the model (1/2 shards up)"
    (tmp_path / "shard-1").touch()
    assert phase() == "starting the router and the HTTP facade"
