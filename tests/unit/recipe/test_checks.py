"""Impossible combinations are recipe errors, with their exact messages (issue 9's strategy keys
included)."""

from __future__ import annotations

import pytest
import yaml

from ftcli.errors import RecipeError
from ftcli.recipe import recipe_from_mapping
from tests.unit.recipe.samples import GOOD, mapping, messages, problems


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
    msgs = messages(tmp_path, GOOD.replace(*change))
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


def test_causal_layouts_must_not_conflict():
    base = yaml.safe_load(GOOD)
    base["task"] = "causal_lm"
    del base["data"]["label_column"]
    base["data"].update(messages_column="messages", prompt_column="q", completion_column="a")
    with pytest.raises(
        RecipeError, match="data.prompt_column: conflicts with data.messages_column"
    ):
        recipe_from_mapping(base)


@pytest.mark.parametrize(
    "m, expected",
    [
        (
            mapping({"kind": "ia3", "dora": True}),
            "method.dora: only applies to lora and qlora, not to method.kind 'ia3' "
            "(remove it, or set method.kind to lora)",
        ),
        (
            mapping({"kind": "lora", "num_virtual_tokens": 20}),
            "method.num_virtual_tokens: only applies to prefix, prompt and ptuning, not to "
            "method.kind 'lora' (remove it, or set method.kind to prefix)",
        ),
        (
            mapping({"kind": "prompt"}, {"unfreeze": {"every_steps": 10}}),
            "train.unfreeze: gradual unfreezing needs transformer blocks to unfreeze; method.kind "
            "'prompt' trains only virtual tokens (remove it, or choose full, lora, qlora, ia3 or vera)",
        ),
        (
            mapping({"kind": "lora", "freeze": ["embeddings"]}),
            "method.freeze: only applies to full, not to method.kind 'lora' "
            "(remove it, or set method.kind to full)",
        ),
        (
            mapping({"kind": "prefix", "layers": [1]}),
            "method.layers: only applies to full, lora, qlora, ia3 and vera, not to method.kind "
            "'prefix' (remove it, or set method.kind to full)",
        ),
        (
            mapping({"kind": "lora", "init": "loftq"}),
            "method.init: loftq initialises LoRA to offset the quantization error of a 4-bit "
            "base: it only applies to method.kind 'qlora' (set method.kind to qlora, or use init "
            "pissa/olora)",
        ),
        (
            mapping({"kind": "qlora", "init": "pissa"}),
            "method.init: pissa rewrites the base weights it starts from, which a 4-bit base "
            "cannot hold (use method.kind lora, or init loftq for a quantized base)",
        ),
        (
            mapping({"kind": "lora", "dora": True, "init": "pissa"}),
            "method.dora: peft cannot combine DoRA with init pissa",
        ),
        (
            mapping({"kind": "lora", "layers": [1, 1]}),
            "method.layers: names a block twice",
        ),
        (
            mapping({"kind": "ia3"}, {"optimizer": {"lora_plus_ratio": 16}}),
            "train.optimizer.lora_plus_ratio: only applies to lora and qlora (LoRA+ speeds up "
            "the B matrices), not to method.kind 'ia3' (remove it, or set method.kind to lora)",
        ),
        (
            mapping({"kind": "prefix"}, {"optimizer": {"layer_decay": 0.8}}),
            "train.optimizer.layer_decay: method.kind 'prefix' trains no transformer blocks, so "
            "there is no per-block rate (remove it, or choose full, lora, qlora, ia3 or vera)",
        ),
        (
            mapping(
                {"kind": "lora"},
                {"early_stopping": {"patience": 2}},
                data={"path": "d.csv", "label_column": "label", "split": {"validation": 0}},
            ),
            "train.early_stopping: early stopping watches validation loss, but there is no "
            "validation split (set data.split.validation above 0, or data.validation_path)",
        ),
        (
            mapping({"kind": "prompt"}, merge={"enabled": True}),
            "merge.enabled: method.kind 'prompt' learns virtual tokens: there are no weights to "
            "fold (remove it (the adapter is used as it is: ftcli predict RUN))",
        ),
        (
            mapping(
                {"kind": "lora"},
                task="causal_lm",
                model={"name": "m", "head": {"hidden": 64}},
                data={"path": "d.jsonl", "text_column": "text"},
            ),
            "model.head: only applies to task classification (a causal LM keeps its lm_head)",
        ),
        (
            mapping(
                {"kind": "lora"},
                {"unfreeze": {"every_steps": 5, "start_layers": 0}},
                task="causal_lm",
                data={"path": "d.jsonl", "text_column": "text"},
            ),
            "train.unfreeze.start_layers: a causal LM has no task head to train alone: start "
            "with at least one block (set start_layers to 1 or more)",
        ),
    ],
)
def test_impossible_combinations_are_recipe_errors(m, expected):
    assert problems(m) == [expected]
