"""The recipe contract: strict schema, located messages with did-you-mean, overrides, derived values."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from pydantic import ValidationError

from ftcli.errors import FtcliError, RecipeError
from ftcli.recipe import load_recipe, parse_override, recipe_from_mapping, suggest_key

GOOD = textwrap.dedent(
    """\
    name: demo
    task: classification
    model:
      name: some-org/some-model
    data:
      path: reviews.csv
      text_column: text
      label_column: category
    method:
      kind: lora
      r: 8
      alpha: 16
      target_modules: [query, value]
    train:
      epochs: 2
      batch_size: 32
      optimizer: {name: adamw, lr: 5.0e-4}
      scheduler: {name: linear, warmup_ratio: 0.06}
    """
)


def _write(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def _messages(tmp_path, text: str, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, text), overrides)
    return [p.render() for p in info.value.problems]


def test_good_recipe_loads_with_derived_values(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD))
    assert r.method.scale == 2.0
    assert r.train.optimizer.lr == 5e-4
    assert str(r.run_dir) == "runs/demo"
    # frozen: nothing writes back into a recipe
    with pytest.raises(ValidationError):
        r.method.r = 4  # type: ignore[misc]


def test_unknown_key_names_file_line_key_and_suggestion(tmp_path):
    text = GOOD.replace("  r: 8\n", "  rank: 8\n")
    assert _messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:11: method.rank: unknown key (did you mean method.r?)"
    ]


def test_an_unknown_key_of_any_characters_is_named(tmp_path):
    """Found by the fuzzer: a top-level key "(" looked like pydantic's union-member noise, was
    dropped from the error's path, and the empty path crashed the suggestion with a traceback."""
    text = GOOD + "(: null\n"
    n = len(GOOD.splitlines()) + 1
    assert _messages(tmp_path, text) == [f"{tmp_path}/recipe.yaml:{n}: (: unknown key"]


def test_misplaced_key_points_to_its_section(tmp_path):
    text = GOOD.replace("  epochs: 2\n", "  epochs: 2\n  lr: 1.0e-4\n")
    assert _messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:16: train.lr: unknown key (did you mean train.optimizer.lr?)"
    ]


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    """`no` is false to YAML 1.1: in a file and through --set it still means no mixed precision."""
    (tmp_path / "reviews.csv").write_text("text,category\na,x\nb,y\n")
    r = load_recipe(_write(tmp_path, GOOD), ["train.mixed_precision=no"])
    assert r.train.mixed_precision == "no"
    r = load_recipe(
        _write(tmp_path, GOOD.replace("  epochs: 2\n", "  epochs: 2\n  mixed_precision: no\n"))
    )
    assert r.train.mixed_precision == "no"
    assert _messages(tmp_path, GOOD, ["train.mixed_precision=yes"]) == [
        "--set: train.mixed_precision: True is not one of: auto, no, bf16, fp16"
    ]


def test_typo_in_a_value_suggests_the_nearest_choice(tmp_path):
    text = GOOD.replace("kind: lora", "kind: lorra")
    assert _messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:10: method.kind: 'lorra' is not one of: full, lora, qlora, ia3, prefix, prompt, ptuning, vera (did you mean 'lora'?)"
    ]


def test_all_problems_are_reported_at_once_in_line_order(tmp_path):
    text = (
        GOOD.replace("task: classification", "task: clasification")
        .replace("  r: 8\n", "  r: 0\n")
        .replace("batch_size: 32", "batch_size: many")
    )
    msgs = _messages(tmp_path, text)
    assert msgs == [
        f"{tmp_path}/recipe.yaml:2: task: 'clasification' is not one of: classification, causal_lm "
        "(did you mean 'classification'?)",
        f"{tmp_path}/recipe.yaml:11: method.r: input should be greater than 0 (got 0)",
        f"{tmp_path}/recipe.yaml:16: train.batch_size: input should be a valid integer, unable to parse string "
        "as an integer (got 'many')",
    ]


def test_duplicate_keys_are_an_error_not_silently_the_last(tmp_path):
    text = GOOD.replace("  epochs: 2\n", "  epochs: 2\n  epochs: 3\n")
    assert _messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:16: train.epochs: duplicate key (first set on line 15); "
        "YAML would silently keep the last (remove one of them)"
    ]


def test_missing_required_key(tmp_path):
    text = GOOD.replace("    model:\n", "").replace("model:\n  name: some-org/some-model\n", "")
    assert _messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:1: model: required key is missing"
    ]


def test_invalid_yaml_names_the_line(tmp_path):
    msgs = _messages(tmp_path, GOOD.replace("  r: 8\n", "  r: [8\n"))
    assert (
        len(msgs) == 1
        and msgs[0].startswith(f"{tmp_path}/recipe.yaml:")
        and "not valid YAML" in msgs[0]
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("kind: lora", "kind: full"),
            "method.r: only applies to lora, qlora and vera, not to method.kind 'full' (remove it, or set method.kind to lora)",
        ),
        (
            ("  target_modules: [query, value]\n", "  target_modules: []\n"),
            "method.target_modules: must name at least one module, or be 'all-linear'",
        ),
        (
            ("label_column: category", "label_column: category\n  prompt_column: p"),
            "data.prompt_column: only applies to task causal_lm",
        ),
        (
            ("optimizer: {name: adamw", "optimizer: {name: adamw, momentum: 2"),
            "train.optimizer.momentum: input should be less than 1 (got 2)",
        ),
    ],
)
def test_impossible_combinations(tmp_path, change, expected):
    msgs = _messages(tmp_path, GOOD.replace(*change))
    assert any(m.endswith(expected) for m in msgs), msgs


def test_qlora_float32_compute_on_cuda_is_refused():
    base = yaml.safe_load(GOOD)
    base["method"]["kind"] = "qlora"
    base["method"]["quantization"] = {"compute_dtype": "float32"}
    base["train"]["device"] = "cuda"
    with pytest.raises(RecipeError) as info:
        recipe_from_mapping(base)
    assert (
        "method.quantization.compute_dtype: float32 compute on CUDA throws away QLoRA's speed"
        in str(info.value)
    )
    base["train"]["device"] = "cpu"  # on a CPU it is the sensible choice
    assert recipe_from_mapping(base).method.quant.compute_dtype == "float32"


def test_quantization_settings_only_for_qlora():
    base = yaml.safe_load(GOOD)
    base["method"]["quantization"] = {"bits": 4}
    with pytest.raises(
        RecipeError, match="method.quantization: only applies to method.kind 'qlora'"
    ):
        recipe_from_mapping(base)


def test_classification_label_column_defaults_to_label():
    base = yaml.safe_load(GOOD)
    del base["data"]["label_column"]
    assert recipe_from_mapping(base).data.label_col == "label"  # the data check names it


def test_causal_layouts_must_not_conflict():
    base = yaml.safe_load(GOOD)
    base["task"] = "causal_lm"
    del base["data"]["label_column"]
    base["data"].update(messages_column="messages", prompt_column="q", completion_column="a")
    with pytest.raises(
        RecipeError, match="data.prompt_column: conflicts with data.messages_column"
    ):
        recipe_from_mapping(base)


def test_overrides_apply_before_validation_and_are_located(tmp_path):
    p = _write(tmp_path, GOOD)
    r = load_recipe(p, ["train.optimizer.lr=1e-4", "method.r=16", "method.target_modules=[query]"])
    assert r.train.optimizer.lr == 1e-4 and isinstance(
        r.train.optimizer.lr, float
    )  # docs/traps.md#yaml-floats-without-a-dot: 1e-4 is a number
    assert r.method.r == 16 and r.method.target_modules == ["query"]
    with pytest.raises(RecipeError) as info:
        load_recipe(p, ["method.r=-1", "train.optimizer.lrr=1"])
    msgs = [x.render() for x in info.value.problems]
    assert msgs == [
        "--set: method.r: input should be greater than 0 (got -1)",
        "--set: train.optimizer.lrr: unknown key (did you mean train.optimizer.lr?)",
    ]


def test_override_syntax_errors():
    with pytest.raises(FtcliError, match="expected KEY=VALUE"):
        parse_override("train.epochs")
    with pytest.raises(FtcliError, match="is not a dotted key"):
        parse_override("train..epochs=1")


def test_resolved_recipe_round_trips(tmp_path):
    for kind in ("full", "lora", "qlora"):
        text = GOOD.replace("kind: lora", f"kind: {kind}")
        if kind == "full":
            text = text.replace("  r: 8\n  alpha: 16\n  target_modules: [query, value]\n", "")
        r = load_recipe(_write(tmp_path, text))
        again = load_recipe(_write(tmp_path, r.to_yaml()))
        assert again.to_yaml() == r.to_yaml()  # resolving twice changes nothing
        assert again.method.quant == r.method.quant and again.train == r.train
        assert (
            again.data == r.data
            and again.model == r.model
            and again.method.target_modules == r.method.target_modules
        )


def test_run_folder_is_accepted_as_a_recipe(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(GOOD)
    assert load_recipe(run).name == "demo"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FtcliError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_suggestions():
    assert suggest_key(("method", "lora_alpha")) == "method.alpha"
    assert suggest_key(("train", "learning_rate")) == "train.optimizer.lr"
    assert suggest_key(("data", "max_seq_length")) == "data.max_length"
    assert suggest_key(("train", "zzzz")) is None
