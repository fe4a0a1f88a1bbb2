"""Files ftcli writes follow the user's umask (issue 16)."""

from __future__ import annotations

import os
import stat

import pytest

from ftcli.util import atomic_dir, atomic_write_text, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    atomic_write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "run.json", {"a": 1})
    with atomic_dir(tmp_path / "merged") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        write_json(tmp / "ftcli-model.json", {"kind": "lora"})
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "run.json") == 0o644
    assert _mode(tmp_path / "merged") == 0o755
    assert _mode(tmp_path / "merged" / "model.safetensors") == 0o644
    assert _mode(tmp_path / "merged" / "ftcli-model.json") == 0o644
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.txt", "x")
    assert _mode(tmp_path / "private.txt") == 0o600
