"""Run folders written before the data stage moved to Arrow (every split a jsonl file) and those
with a big training split held as train.arrow both open in `ftcli eval`, `predict` and `merge`,
and `--resume`'s same-data check reads them."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from ftcli.cli import app
from ftcli.data import examples
from ftcli.data.examples import SPLITS, PreparedData, load_prepared, save_prepared
from ftcli.data.rows import Rows
from ftcli.merge import merge
from ftcli.rundir import check_same_data
from ftcli.util import write_jsonl
from tests.conftest import FAST, trained_run


def _relayout(run, copy, layout: str, monkeypatch) -> PreparedData:
    """A copy of ``run`` whose data/ folder is written in ``layout``; returns its splits."""
    shutil.copytree(run, copy)
    data = copy / "data"
    p = load_prepared(data)
    splits = {s: list(p.splits[s]) for s in SPLITS}
    for f in data.iterdir():
        f.unlink()
    if layout == "main-jsonl":  # as the list-based data stage wrote it, byte for byte
        digests = {}
        for s, rows in splits.items():
            write_jsonl(data / f"{s}.jsonl", rows)
            digests[s] = hashlib.sha256((data / f"{s}.jsonl").read_bytes()).hexdigest()
        (data / "labels.json").write_text(json.dumps(p.labels, indent=2) + "\n")
        stats = {k: v for k, v in p.stats.items() if k != "sha256"}
        (data / "data.json").write_text(json.dumps({**stats, "sha256": digests}, indent=2) + "\n")
    else:
        monkeypatch.setattr(examples, "TRAIN_JSONL_MAX", 0)
        arrow = Rows(__import__("pyarrow").Table.from_pylist(splits["train"]))
        save_prepared(PreparedData({**splits, "train": arrow}, p.labels, p.stats), data)
        assert (data / "train.arrow").is_file() and not (data / "train.jsonl").exists()
    return PreparedData(splits, p.labels, p.stats)


@pytest.mark.parametrize("layout", ["main-jsonl", "train-arrow"])
def test_run_folder_layouts_open_in_eval_predict_merge(
    tmp_path_factory, tiny_models, tiny_data, tmp_path, monkeypatch, layout
):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    copy = tmp_path / "run"
    splits = _relayout(run, copy, layout, monkeypatch)

    back = load_prepared(copy / "data")
    assert isinstance(back.splits["train"], Rows) == (layout == "train-arrow")
    for s in SPLITS:
        assert list(back.splits[s]) == splits.splits[s]
    check_same_data(back, copy / "data")  # what --resume checks

    r = CliRunner().invoke(app, ["eval", str(copy), "--no-robustness", *FAST, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    saved = json.loads((run / "run.json").read_text())["eval"]["metrics"]
    assert rep["metrics"]["accuracy"] == pytest.approx(saved["accuracy"])

    merged = merge(copy, tmp_path / "merged")  # verified on the run's test inputs
    assert merged.samples > 0 and merged.prediction_agreement == 1.0

    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"text": e["text"]} for e in splits.splits["test"][:3]])
    r = CliRunner().invoke(
        app, ["predict", str(copy), "--input", str(src), "--output", str(tmp_path / "p.jsonl")]
    )
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3
