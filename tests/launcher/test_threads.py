"""The launcher's compute threads for shards that share the host with the router and facade."""

from __future__ import annotations

import os

from launcher.__main__ import shard_threads


def test_shards_share_every_core():
    cores = len(os.sched_getaffinity(0))
    assert shard_threads(1, {}) == ["--threads", str(cores)]
    assert shard_threads(4, {}) == ["--threads", str(max(1, cores // 4))]


def test_explicit_thread_settings_win():
    assert shard_threads(1, {"SHARD_THREADS": "2"}) == []
    assert shard_threads(1, {"OMP_NUM_THREADS": "2"}) == []
