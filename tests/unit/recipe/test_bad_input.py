"""Bad recipe input ends in one clear problem per fault, located and with its fix: bytes that are
not UTF-8, integers past Python's digit limit, unreadable paths, inf/nan, absurd sizes, YAML
booleans where numbers go, a local model path that is not there; and ``--set method.kind``
dropping every file key the new kind does not take."""

from __future__ import annotations

import os

import pytest

from ftcli.errors import FtcliError, RecipeError
from ftcli.recipe import load_recipe, parse_override
from tests.unit.recipe.samples import GOOD, messages


def _validate(path, capsys, *extra) -> tuple[int, str]:
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path), "--no-data", *extra])
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfename: q\n", GOOD.replace("demo", "d\xe9mo").encode("latin-1")],
    ids=["utf16-bom-bytes", "latin-1"],
)
def test_a_recipe_that_is_not_utf8_is_one_located_error(tmp_path, capsys, raw):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    code, err = _validate(path, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: 1 problem in the recipe:\n"), err
    assert f"  {path}:1: not UTF-8 text (byte 0x" in err and "save the file as UTF-8" in err


def test_a_huge_integer_in_the_file_is_located(tmp_path):
    msgs = messages(tmp_path, GOOD.replace("  r: 8\n", "  r: " + "9" * 5000 + "\n"))
    assert len(msgs) == 1
    assert msgs[0].startswith(f"{tmp_path}/recipe.yaml:11: an integer of 5000 digits"), msgs


def test_a_huge_integer_through_set_is_one_error():
    with pytest.raises(FtcliError) as info:
        parse_override("method.r=" + "9" * 5000)
    msg = info.value.render()
    assert msg.startswith("--set method.r=999") and "integer of 5000 digits" in msg, msg
    assert len(msg) < 400  # the number itself is not echoed in full


def test_a_folder_given_as_the_recipe_says_so(tmp_path, capsys):
    code, err = _validate(tmp_path, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: {tmp_path} is a folder without a recipe.yaml"), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file regardless")
def test_an_unreadable_recipe_is_one_error(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    path.chmod(0)
    code, err = _validate(path, capsys)
    assert code == 1 and "Traceback" not in err and "cannot read" in err, err


def test_a_read_error_is_one_error_whoever_runs_it(tmp_path, monkeypatch):
    """PermissionError (and any OSError) while reading: the same message as root or not."""
    from pathlib import Path

    path = tmp_path / "r.yaml"
    path.write_text(GOOD)

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (p,) = info.value.problems
    assert p.render().startswith(f"{path}: cannot read the recipe: Permission denied"), p.render()


@pytest.mark.parametrize(
    ("old", "new", "key", "says"),
    [
        ("lr: 5.0e-4", "lr: .inf", "train.optimizer.lr", "finite number"),
        ("lr: 5.0e-4", "lr: .nan", "train.optimizer.lr", "finite number"),
        ("epochs: 2", "epochs: 1e400", "train.epochs", "finite number"),
        ("epochs: 2", "epochs: 1e9", "train.epochs", "less than or equal to 10000"),
        ("  r: 8\n", "  r: 1e9\n", "method.r", "less than or equal to 4096"),
        ("  r: 8\n", "  r: 1000000000\n", "method.r", "less than or equal to 4096"),
        ("  r: 8\n", "  r: true\n", "method.r", "a number, not true/false"),
        ("batch_size: 32", "batch_size: yes", "train.batch_size", "a number, not true/false"),
        ("epochs: 2", "epochs: on", "train.epochs", "a number, not true/false"),
        (
            "label_column: category",
            "label_column: category\n  max_length: 1e9",
            "data.max_length",
            "less than or equal to 1048576",
        ),
    ],
)
def test_numbers_that_cannot_be_meant_are_refused_at_their_key(tmp_path, old, new, key, says):
    msgs = messages(tmp_path, GOOD.replace(old, new))
    assert len(msgs) == 1, msgs
    assert f": {key}: " in msgs[0] and says in msgs[0], msgs


def test_bools_are_refused_in_lists_of_numbers_too(tmp_path):
    msgs = messages(tmp_path, GOOD.replace("  r: 8\n", "  r: 8\n  layers: [0, true]\n"))
    assert len(msgs) == 1 and ": method.layers: " in msgs[0] and "true/false" in msgs[0], msgs


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "models/a/b", "~/nope-x9"])
def test_validate_reports_a_local_model_path_that_is_not_there(tmp_path, capsys, name):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace("some-org/some-model", name))
    code, err = _validate(path, capsys)
    assert code == 1 and "Traceback" not in err, err
    assert "model.name: no such file or folder" in err and "hub id" in err, err


def test_a_hub_id_is_not_mistaken_for_a_missing_path(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    code, err = _validate(path, capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("kind", "dropped"),
    [
        ("ia3", "r, alpha, dropout, init"),
        ("prefix", "r, alpha, dropout, target_modules, init"),
        ("full", "r, alpha, dropout, target_modules, init"),
    ],
)
def test_switching_kind_through_set_drops_what_it_does_not_take(tmp_path, kind, dropped):
    """One note for all the file's keys the new kind does not read (before: ia3 stopped on each)."""
    text = GOOD.replace("  r: 8\n", "  r: 8\n  dropout: 0.1\n  init: kaiming\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    r = load_recipe(path, [f"method.kind={kind}"])
    assert r.method.kind == kind
    listed = ", ".join(f"method.{k}" for k in dropped.split(", "))
    assert r.notes == [f"--set method.kind={kind}: dropped {listed} (no meaning for {kind})"]


def test_a_key_given_with_set_is_kept_and_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["method.kind=ia3", "method.r=4"])
    assert [p.key for p in info.value.problems] == ["method.r"]
