"""Atomic writes: the final name appears whole, with the mode the umask gives a new file."""

import os
import stat

import pytest

from specdec.io import umask, write_json


@pytest.fixture
def set_umask():
    """set_umask(mask) for the test; the original umask comes back after it."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_keep_the_umasks_mode(set_umask, tmp_path, mask, mode):
    set_umask(mask)
    assert umask() == mask
    write_json(tmp_path / "result.json", {"status": "ok"})
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
