"""The tune section without training: space checks, trial recipes through the --set path, the
grid queued once in a shared study."""

from __future__ import annotations

import pytest

from ftcli.errors import RecipeError
from ftcli.recipe import recipe_from_mapping


def base(tmp_path, **tune) -> dict:
    return {
        "name": "s",
        "task": "classification",
        "model": {"name": "unused"},
        "data": {"path": "x.csv", "label_column": "label"},
        "method": {"kind": "lora"},
        "output_dir": str(tmp_path / "runs"),
        "tune": {"space": {"method.r": {"choice": [4, 8]}}, **tune},
    }


def test_trial_recipe_is_the_base_with_the_values_set(tmp_path):
    from ftcli.tune import trial_recipe

    r = recipe_from_mapping(base(tmp_path))
    t = trial_recipe(r, {"method.r": 8, "train.optimizer.lr": 0.003}, "trial-004", tmp_path / "t")
    assert t.method.r == 8 and t.train.optimizer.lr == 0.003
    assert t.run_dir == tmp_path / "t" / "trial-004" and t.tune is None
    assert t.data == r.data


def test_grid_is_queued_once_and_caps_the_study(tmp_path):
    from ftcli.tune import _counts, enqueue_grid, open_study

    space = {"method.r": {"choice": [4, 8]}, "method.dropout": {"choice": [0.0, 0.1, 0.2]}}
    r = recipe_from_mapping(base(tmp_path, sampler="grid", space=space))
    study = open_study(r)
    assert enqueue_grid(study, r) == 6
    assert enqueue_grid(open_study(r), r) == 6  # a second process: nothing queued twice
    trials = study.get_trials()
    assert len(trials) == 6 and {t.state.name for t in trials} == {"WAITING"}
    assert _counts(study) == (0, 0, 0)
    seen = set()
    for _ in range(6):
        t = study.ask()
        seen.add(
            (
                t.suggest_categorical("method.r", [4, 8]),
                t.suggest_categorical("method.dropout", [0.0, 0.1, 0.2]),
            )
        )
        study.tell(t, 0.0)
    assert len(seen) == 6


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"space": {"method.r": {"choice": []}}}, "empty choice"),
        ({"space": {"train.optimizer.lr": {"uniform": [1.0, 0.1]}}}, "low 1.0 > high 0.1"),
        ({"space": {"method.rank": {"choice": [4]}}}, "unknown key (did you mean method.r?)"),
        ({"space": {"method.r": {"choice": [0]}}}, "the value 0 makes an invalid recipe"),
        ({"space": {"method.r": {"between": [1, 2]}}}, "expected one of"),
        ({"space": {"train.optimizer.lr": {"log_uniform": [0, 1]}}}, "log_uniform needs low > 0"),
        ({"sampler": "grid", "space": {"method.dropout": {"uniform": [0, 0.1]}}}, "finite space"),
        ({"metric": "accuracy", "space": {"method.r": {"choice": [4]}}, "x": 1}, "unknown key"),
        ({"space": {}}, "the search space is empty"),
    ],
)
def test_bad_spaces_are_recipe_errors(tmp_path, tune, message):
    with pytest.raises(RecipeError) as exc:
        recipe_from_mapping(base(tmp_path, **tune))
    assert message in str(exc.value)
