"""Every C kernel builds on this host, and the serving paths get them.

A kernel that fails to compile is skipped at run time with a warning (the shard then
serves through a slower path), so a change to a shared header that breaks one file
(say, a helper whose name another kernel already uses) would only show as lost speed.
"""

from __future__ import annotations

import ctypes
import subprocess

import pytest

from shard.numerics.kernels import HERE, _build, _compiler


@pytest.mark.parametrize("name", sorted(p.stem for p in HERE.glob("*.c")))
def test_every_kernel_compiles_and_loads(name):
    compiler = _compiler()
    assert compiler, "no C compiler: the shard's kernels need one"
    try:
        library = ctypes.CDLL(str(_build(compiler, name)))
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{name}.c does not build: {error.stderr.decode(errors='replace')[-2000:]}")
    assert library is not None
