"""``ftcli eval`` (ftcli/cli/evaluate.py): which run it scores and the flag combinations that mean
nothing (issue 11)."""

from __future__ import annotations

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
