"""Located messages with did-you-mean: unknown, misplaced and missing keys, misspelt values."""

from __future__ import annotations

from ftcli.recipe import suggest_key
from tests.unit.recipe.samples import GOOD, messages


def test_unknown_key_names_file_line_key_and_suggestion(tmp_path):
    text = GOOD.replace("  r: 8\n", "  rank: 8\n")
    assert messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:11: method.rank: unknown key (did you mean method.r?)"
    ]


def test_an_unknown_key_of_any_characters_is_named(tmp_path):
    """Found by the fuzzer: a top-level key "(" looked like pydantic's union-member noise, was
    dropped from the error's path, and the empty path crashed the suggestion with a traceback."""
    text = GOOD + "(: null\n"
    n = len(GOOD.splitlines()) + 1
    assert messages(tmp_path, text) == [f"{tmp_path}/recipe.yaml:{n}: (: unknown key"]


def test_misplaced_key_points_to_its_section(tmp_path):
    text = GOOD.replace("  epochs: 2\n", "  epochs: 2\n  lr: 1.0e-4\n")
    assert messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:16: train.lr: unknown key (did you mean train.optimizer.lr?)"
    ]


def test_typo_in_a_value_suggests_the_nearest_choice(tmp_path):
    text = GOOD.replace("kind: lora", "kind: lorra")
    assert messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:10: method.kind: 'lorra' is not one of: full, lora, qlora, ia3, prefix, prompt, ptuning, vera (did you mean 'lora'?)"
    ]


def test_missing_required_key(tmp_path):
    text = GOOD.replace("    model:\n", "").replace("model:\n  name: some-org/some-model\n", "")
    assert messages(tmp_path, text) == [f"{tmp_path}/recipe.yaml:1: model: required key is missing"]


def test_suggestions():
    assert suggest_key(("method", "lora_alpha")) == "method.alpha"
    assert suggest_key(("train", "learning_rate")) == "train.optimizer.lr"
    assert suggest_key(("data", "max_seq_length")) == "data.max_length"
    assert suggest_key(("train", "zzzz")) is None
