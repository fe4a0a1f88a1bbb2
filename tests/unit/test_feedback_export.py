"""``ftcli feedback export`` (ftcli/data/feedback_export.py): every kind of feedback chat and serve
record becomes preference data (/fix a pair, /good and /bad KTO rows); duplicates and conflicting
votes are counted, never merged; the file trains as written (task preference reads it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ftcli.data.examples import prepare
from ftcli.data.feedback_export import collect, export, feedback_files, summary
from ftcli.errors import FtcliError
from ftcli.recipe import recipe_from_mapping
from ftcli.serve.feedback import FeedbackLog
from tests.conftest import run_cli


def _u(text):
    return [{"role": "user", "content": text}]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with what chat writes: every verdict, a duplicate, a conflict, a classifier
    row."""
    run = tmp_path / "runs" / "chat"
    log = FeedbackLog(run / "feedback.jsonl", "runs/chat")
    log.chat(_u("hi"), "hello", "good")
    log.chat(_u("hi"), "hello", "good")  # the same verdict again
    log.chat(_u("2+2?"), "5", "fixed", "4")
    log.chat([*_u("hi"), {"role": "assistant", "content": "hello"}, *_u("bye")], "ok", "bad")
    log.chat(_u("x"), "y", "good")
    log.chat(_u("x"), "y", "bad")  # conflicts with the /good above
    log.chat(_u("3+3?"), "7", "fixed", "6")
    log.chat(_u("3+3?"), "7", "good")  # /good on an answer another vote fixed: a conflict
    log.classification("a text", "pos", "good", ["pos", "neg"])
    return run


def test_every_feedback_kind_becomes_its_row(run_dir, tmp_path):
    out = tmp_path / "pairs.jsonl"
    tally = export([str(run_dir)], out)
    rows = _rows(out)
    assert rows == [
        {"prompt": _u("hi"), "completion": "hello", "label": "desirable"},
        {"prompt": _u("2+2?"), "chosen": "4", "rejected": "5"},
        {
            "prompt": [*_u("hi"), {"role": "assistant", "content": "hello"}, *_u("bye")],
            "completion": "ok",
            "label": "undesirable",
        },
    ]
    assert tally.read == {"good": 4, "bad": 2, "fixed": 2}
    assert (tally.pairs, tally.kto_rows, tally.duplicates) == (1, 2, 1)
    assert (tally.conflicts, tally.conflicting_rows) == (2, 4)
    assert tally.skipped == {"not chat feedback (a classifier's)": 1}
    lines = "\n".join(summary(tally))
    assert "left out 1 duplicate rows" in lines
    assert "left out 4 rows: 2 prompt+answer voted both good and bad" in lines
    assert "pairs and KTO rows" in lines


def test_good_and_bad_only_is_kto_only_and_says_so(tmp_path):
    log = FeedbackLog(tmp_path / "fb.jsonl", "m")
    log.chat(_u("a"), "b", "good")
    log.chat(_u("c"), "d", "bad")  # to fb-rejected.jsonl, read beside fb.jsonl
    tally = export([str(tmp_path / "fb.jsonl")], tmp_path / "out.jsonl")
    assert tally.as_dict()["kto_only"] and tally.kto_rows == 2
    assert any("KTO-only" in line and "preference.loss=kto" in line for line in summary(tally))
    assert feedback_files([str(tmp_path / "fb.jsonl")]) == [
        tmp_path / "fb.jsonl",
        tmp_path / "fb-rejected.jsonl",
    ]


def test_the_export_trains_as_written(run_dir, tmp_path):
    """task preference reads the file: the pairs for dpo (the KTO rows counted as unpaired),
    every row for kto."""
    out = tmp_path / "pairs.jsonl"
    export([str(run_dir)], out)
    extra = tmp_path / "more.jsonl"
    log = FeedbackLog(extra, "m")
    for i in range(6):
        log.chat(_u(f"q{i}"), f"wrong {i}", "fixed", f"right {i}")
    export([str(run_dir), str(extra)], out)
    recipe = recipe_from_mapping(
        {
            "name": "f",
            "task": "preference",
            "model": {"name": "m"},
            "data": {"path": str(out), "split": {"validation": 0.0, "test": 0.2}},
            "method": {"kind": "lora"},
        }
    )
    dpo = prepare(recipe)
    assert sum(dpo.stats["sizes"].values()) == 7 and dpo.stats["dropped"]["unpaired"] == 2
    kto = prepare(recipe.model_copy(update={"preference": SimpleNamespace(loss="kto")}))
    assert sum(kto.stats["sizes"].values()) == 9 and kto.stats["layout"] == "pairs and kto rows"


def test_nothing_to_export_and_bad_lines_are_errors(tmp_path):
    with pytest.raises(FtcliError, match="no such run folder or feedback file"):
        export([str(tmp_path / "nope")], tmp_path / "o.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtcliError, match="no feedback files"):
        export([str(tmp_path / "empty")], tmp_path / "o.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [], "feedback": "good"}\nnot json\n{"x": 1}\n')
    with pytest.raises(FtcliError, match=r"bad.jsonl:2: not a JSON line"):
        export([str(bad)], tmp_path / "o.jsonl")
    only_votes = tmp_path / "votes.jsonl"
    log = FeedbackLog(only_votes, "m")
    log.chat(_u("x"), "y", "good")
    log.chat(_u("x"), "y", "bad")
    with pytest.raises(FtcliError, match="2 left out as conflicting votes"):
        export([str(only_votes)], tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_line_being_appended_is_left_out(tmp_path):
    f = tmp_path / "fb.jsonl"
    FeedbackLog(f, "m").chat(_u("a"), "b", "good")
    with open(f, "a") as fh:
        fh.write('{"messages": [{"role": "us')  # a server's append, not finished
    rows, tally = collect([f])
    assert len(rows) == 1 and tally.read["good"] == 1


def test_the_command(run_dir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    code, result = run_cli(capsys, "feedback", "export", str(run_dir), "--out", str(out))
    assert code == 0 and result["ok"]
    assert result["pairs"] == 1 and result["kto_rows"] == 2 and result["conflicts"] == 2
    assert result["out"] == str(out) and len(_rows(out)) == 3
    code, result = run_cli(capsys, "feedback", "export", str(tmp_path / "x"), "--out", str(out))
    assert code == 1 and "no such run folder" in result["error"]


def test_the_bundled_recipe_trains_on_the_export():
    """feedback-dpo: task preference, data.path the export's default name, a placeholder model."""
    from ftcli.recipe import load_recipe, resolve_recipe_path

    r = load_recipe(resolve_recipe_path("feedback-dpo"))
    assert r.task == "preference" and r.data.path.endswith("pairs.jsonl")
    assert r.model.name == "runs/chat"
    loss = getattr(getattr(r, "preference", None), "loss", "dpo")
    assert loss == "dpo"
