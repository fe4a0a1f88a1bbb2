"""Cross-validation folds: disjoint, complete, stratified, and no test example reaches training."""

from __future__ import annotations

import collections
import json

import pytest

from ftcli.data.examples import _key, prepare
from ftcli.errors import FtcliError
from ftcli.recipe import recipe_from_mapping
from ftcli.tune.repeats import canonical_columns, fold_indices, mean_std, pool, variant
from tests.conftest import tiny_recipe


def test_folds_are_disjoint_complete_and_stratified():
    examples = [{"text": f"t{i}", "label": "a" if i % 3 else "b"} for i in range(30)]
    folds = fold_indices(examples, 5, seed=0)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == list(range(30)) and len(flat) == len(set(flat))
    for f in folds:
        counts = collections.Counter(examples[i]["label"] for i in f)
        assert counts == {"a": 4, "b": 2}  # 20 a / 10 b over 5 folds
    assert fold_indices(examples, 5, seed=0) == folds and fold_indices(examples, 5, seed=1) != folds
    with pytest.raises(FtcliError, match="too few"):
        fold_indices(examples[:3], 5, seed=0)


def test_fold_runs_never_train_on_their_test_fold(tmp_path, tiny_data):
    mapping = tiny_recipe(tmp_path, {"bert": "unused"}, tiny_data)
    recipe = recipe_from_mapping(mapping)
    examples = pool(recipe)
    # a duplicate in the pool would sit in two folds: prepare must still keep it out of training
    examples = examples + [examples[0]]
    folds = fold_indices(examples, 3, seed=0)
    cols = canonical_columns(examples)
    seen_test = set()
    for k, test_idx in enumerate(folds, 1):
        held = set(test_idx)
        d = tmp_path / f"fold{k}"
        d.mkdir()
        (d / "train.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for j, e in enumerate(examples) if j not in held)
        )
        (d / "test.jsonl").write_text("".join(json.dumps(examples[j]) + "\n" for j in test_idx))
        changes = {f"data.{c}": v for c, v in cols.items()}
        changes.update(
            {
                "data.path": str(d / "train.jsonl"),
                "data.test_path": str(d / "test.jsonl"),
                "data.format": "jsonl",
                "data.split.test": None,
            }
        )
        prepared = prepare(variant(recipe, f"fold{k}", **changes))
        test = {_key(e) for e in prepared.splits["test"]}
        trained_on = {_key(e) for s in ("train", "validation") for e in prepared.splits[s]}
        assert test and not (test & trained_on)
        seen_test |= test
    assert seen_test == {_key(e) for e in examples}


def test_cv_refuses_a_fixed_test_file(tmp_path, tiny_data):
    mapping = tiny_recipe(tmp_path, {"bert": "unused"}, tiny_data)
    mapping["data"]["test_path"] = str(tiny_data["classification"])
    del mapping["data"]["split"]["test"]
    with pytest.raises(FtcliError, match="own test folds"):
        pool(recipe_from_mapping(mapping))


def test_mean_std():
    s = mean_std([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    assert mean_std([0.5])["std"] == 0.0
