"""The defects a new user tripped over (issue 11), each pinned by a test that failed before."""

from __future__ import annotations

import json

import pytest
import yaml

from ftcli.cli import main


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_validate_passes_offline_with_an_uncached_hub_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "hub",
                "task": "classification",
                "model": {"name": "some/model"},
                "data": {"path": "nobody/never-cached-dataset", "label_column": "label"},
                "method": {"kind": "lora"},
            }
        )
    )
    code, out, err = _cli(capsys, "validate", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["checked"] == ["schema"]
    lines = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1 and "data columns not checked" in lines[0]
    assert "nobody/never-cached-dataset" in lines[0] and "offline" in lines[0]
    code, _, _ = _cli(capsys, "validate", str(path), "--strict")
    assert code == 1
