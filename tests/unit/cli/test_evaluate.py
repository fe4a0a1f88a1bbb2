"""``ftcli eval`` (ftcli/cli/evaluate.py): which run it scores and the flag combinations that mean
nothing (issue 11)."""

from __future__ import annotations

import pytest
import yaml


def test_eval_baseline_run_without_a_run_to_score_is_an_error(tmp_path, cli):
    code, _, err = cli("eval", "--baseline", str(tmp_path / "B"))
    assert code == 1
    assert f"--baseline {tmp_path / 'B'} names the run to compare with, but not the run" in err


def test_eval_latest_run_looks_in_the_output_dir_given(tmp_path, cli):
    from ftcli.rundir import latest_run

    (tmp_path / "out" / "r1").mkdir(parents=True)
    (tmp_path / "out" / "r1" / "run.json").write_text("{}")
    assert latest_run(tmp_path / "out") == tmp_path / "out" / "r1"
    code, _, err = cli("eval", "--output-dir", str(tmp_path / "none"))
    assert code == 1 and f"no runs in {tmp_path / 'none'}/" in err


def test_eval_takes_a_recipe_for_its_run_folder(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "mine",
                "task": "classification",
                "model": {"name": "m"},
                "data": {"path": "d.csv"},
                "method": {"kind": "lora"},
                "output_dir": str(tmp_path / "elsewhere"),
            }
        )
    )
    code, _, err = cli("eval", str(path))
    assert code == 1 and str(tmp_path / "elsewhere" / "mine") in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["A", "B"], "2 run folders given: evaluate one, or several with --ensemble"),
        (["A", "--ensemble"], "--ensemble needs at least two run folders"),
        (["A", "B", "--ensemble", "--baseline", "probe"], "it takes no --baseline or --benchmark"),
        (["A", "--baseline", "probe", "--split", "validation"], "on the sealed test split only"),
        (["A", "--limit", "5"], "--limit applies to --benchmark only"),
    ],
)
def test_flag_combinations_that_mean_nothing_fail_before_any_run_is_read(
    tmp_path, cli, args, message
):
    folders = [str(tmp_path / a) if a in ("A", "B") else a for a in args]  # neither exists
    code, out, err = cli("eval", *folders)
    assert code == 1 and message in err and "Traceback" not in err


def test_eval_mode_says_which_evaluation_the_flags_ask_for():
    from ftcli.evaluation.modes import eval_mode

    none = {"--limit": None}
    assert eval_mode(1, None, None, False, "validation", none) == "split"
    assert eval_mode(1, ["default"], None, False, "test", none) == "compare"
    assert eval_mode(1, None, ["rt_sentiment"], False, "test", {"--limit": 5}) == "compare"
    assert eval_mode(3, None, None, True, "test", none) == "ensemble"
