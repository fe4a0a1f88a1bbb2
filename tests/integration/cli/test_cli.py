"""The command line as a user meets it: help, exit codes, one clear message on bad input (no
traceback, nothing half-written), --json, and every bundled recipe validating."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftcli.bundled import recipes_dir
from ftcli.recipe import load_recipe
from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted(recipes_dir().glob("*.yaml"))


def ftcli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ftcli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "command",
    ["train", "validate", "recipes", "eval", "merge", "estimate-memory", "predict", "chat", "cv"],
)
def test_every_command_has_help_with_examples(command):
    proc = ftcli(command, "--help")
    assert proc.returncode == 0 and "Examples" in proc.stdout, proc.stdout


def test_usage_error_exits_2():
    proc = ftcli("train")
    assert proc.returncode == 2 and "Missing argument" in proc.stderr


def test_recipes_lists_every_bundled_recipe():
    proc = ftcli("recipes", "--json")
    assert proc.returncode == 0
    listed = {r["file"] for r in json.loads(proc.stdout)["recipes"]}
    assert listed == {f"recipes/{p.name}" for p in RECIPES}
    assert len(RECIPES) >= 8


def test_bundled_recipes_resolve_by_name_from_any_folder(tmp_path):
    """The name, and the form `ftcli recipes` lists, find the recipe inside the package from a
    folder that holds no recipes; an overlay's relative ``extends:`` resolves beside it."""
    for given in ("quickstart", "recipes/quickstart.yaml", "quickstart-dora"):
        proc = ftcli("validate", given, "--json", "--no-data", cwd=tmp_path)
        assert proc.returncode == 0, (given, proc.stderr)
        assert json.loads(proc.stdout)["ok"], given
    proc = ftcli("validate", "recipes/../recipes/quickstart.yaml", cwd=tmp_path)
    assert_user_error(proc, "recipe not found")


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_bundled_recipe_validates(recipe):
    """Local-data recipes are checked against their data's columns; hub ones by schema."""
    local = load_recipe(recipe).data.path.startswith("pkg:")  # overlays resolve their extends:
    proc = ftcli("validate", recipe, "--json", *([] if local else ["--no-data"]))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and ("data columns" in out["checked"]) == local


def test_bad_recipe_lists_every_problem_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (recipes_dir() / "quickstart.yaml")
        .read_text()
        .replace("  r: 8\n", "  rank: 8\n")
        .replace("kind: lora", "kind: lorra")
    )
    proc = ftcli("validate", bad)
    assert_user_error(
        proc,
        "2 problems in the recipe:",
        f"{bad}:",
        "method.rank: unknown key (did you mean method.r?)",
        "method.kind: 'lorra' is not one of: full, lora, qlora, ia3, prefix, prompt, ptuning, vera (did you mean 'lora'?)",
    )


def test_json_errors_are_one_object_on_stdout(tmp_path):
    proc = ftcli("validate", tmp_path / "missing.yaml", "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["ok"] is False and "recipe not found" in out["error"]


def _train_bad(
    tmp_path, tiny_models, tiny_data, change
) -> tuple[subprocess.CompletedProcess, Path]:
    mapping = tiny_recipe(tmp_path, tiny_models, tiny_data)
    change(mapping)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    t0 = time.perf_counter()
    proc = ftcli("train", path, cwd=tmp_path)
    proc.seconds = time.perf_counter() - t0
    return proc, Path(mapping["output_dir"]) / mapping["name"]


def test_missing_data_file(tmp_path, tiny_models, tiny_data):
    proc, run_dir = _train_bad(
        tmp_path,
        tiny_models,
        tiny_data,
        lambda m: m["data"].update(path=str(tmp_path / "nope.csv")),
    )
    assert_user_error(proc, "data not found", "nope.csv")
    assert not run_dir.exists()  # nothing written


def test_empty_dataset(tmp_path, tiny_models, tiny_data):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    proc, run_dir = _train_bad(
        tmp_path, tiny_models, tiny_data, lambda m: m["data"].update(path=str(empty))
    )
    assert_user_error(proc, "the dataset is empty")
    assert not run_dir.exists()


def test_unknown_label_column_names_file_and_line(tmp_path, tiny_models, tiny_data):
    proc, run_dir = _train_bad(
        tmp_path, tiny_models, tiny_data, lambda m: m["data"].update(label_column="lable")
    )
    assert_user_error(
        proc,
        f"{tmp_path / 'r.yaml'}:",
        "data.label_column: column 'lable' is not in the data",
        "did you mean 'label'?",
    )
    assert not run_dir.exists()


def test_unknown_target_module_lists_the_real_ones(tmp_path, tiny_models, tiny_data):
    proc, run_dir = _train_bad(
        tmp_path, tiny_models, tiny_data, lambda m: m["method"].update(target_modules=["q_proj"])
    )  # a BERT has 'query'
    assert_user_error(
        proc,
        "method.target_modules: no module named 'q_proj' in BertForSequenceClassification",
        "query",
        "value",
    )
    assert not run_dir.exists()


def test_unreachable_hub_id_fails_fast_with_a_fix(tmp_path, tiny_models, tiny_data):
    proc, run_dir = _train_bad(
        tmp_path,
        tiny_models,
        tiny_data,
        lambda m: m["model"].update(name="some-org/not-cached-model"),
    )
    assert_user_error(
        proc,
        "'some-org/not-cached-model' is not a local path and is not in the Hugging Face cache",
        "hint: point it at a local folder",
    )
    # not a 47 s network timeout (docs/traps.md#a-missing-network-is-slow-to-fail)
    assert proc.seconds < 20, proc.seconds
    assert not run_dir.exists()


def test_existing_run_is_not_overwritten(tmp_path, tiny_models, tiny_data):
    mapping = tiny_recipe(
        tmp_path, tiny_models, tiny_data, task="classification", kind="lora", arch="llama-random"
    )
    mapping["train"]["max_steps"] = 2
    mapping["merge"] = {"enabled": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    first = ftcli("train", path, "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_json = Path(mapping["output_dir"]) / mapping["name"] / "run.json"
    before = run_json.read_text()
    again = ftcli("train", path, cwd=tmp_path)
    assert_user_error(again, "already holds a run (status: completed)", "--force starts it over")
    assert run_json.read_text() == before
    out = ftcli("eval", run_json.parent, "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["metrics"] == json.loads(before)["eval"]["metrics"]
    bad_split = ftcli("eval", run_json.parent, "--split", "dev", cwd=tmp_path)
    assert_user_error(bad_split, "has no 'dev' split", "choose one of: train, validation, test")
