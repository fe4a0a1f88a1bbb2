"""No recipe key can be accepted and ignored: every key of the schema declares when it applies
(ftcli.recipe.APPLIES), and setting it where it does not apply is reported."""

from __future__ import annotations

import copy
import itertools

import pytest

from ftcli.errors import RecipeError
from ftcli.recipe import APPLIES, apply_overrides, recipe_from_mapping
from ftcli.recipe.suggest import _all_keys

BASE = {
    "name": "walk",
    "model": {"name": "some/model"},
    "data": {"path": "data.csv"},
}
LAYOUTS = {
    "classification": {"task": "classification", "data": {"label_column": "label"}},
    "text": {"task": "causal_lm", "data": {}},
    "chat": {"task": "causal_lm", "data": {"messages_column": "messages"}},
    "instruction": {
        "task": "causal_lm",
        "data": {"instruction_column": "i", "output_column": "o"},
    },
    "completion": {"task": "causal_lm", "data": {"prompt_column": "p", "completion_column": "c"}},
    # preference pairs, one layout per group of preference keys (issue 23)
    **{
        f"preference-{loss}": {"task": "preference", "preference": {"loss": loss}}
        for loss in ("dpo", "simpo", "orpo", "kto")
    },
    "reward": {"task": "reward", "data": {}},
}
METHODS = [
    {"kind": "full"},
    {"kind": "lora"},
    {"kind": "qlora"},
    {"kind": "qlora", "quantization": {"bits": 8}},
]
TRAINS = [
    {},
    {"max_steps": 3, "optimizer": {"name": "sgd"}, "scheduler": {"name": "plateau"}},
    {"optimizer": {"name": "adamw"}, "scheduler": {"name": "linear", "warmup_steps": 2}},
]
SPLITS = [
    {},
    {"split": {"validation": 0.0}},
    {"validation_path": "v.csv", "test_path": "t.csv"},
    {"streaming": True},  # valid with TRAINS' max_steps only
]
MERGES = [{}, {"enabled": False}]

# A value to set for keys whose default is None (a default of None is not a settable value).
SAMPLES = {
    "data.label_column": "label",
    "data.labels": ["a", "b"],
    "data.prompt_column": "p",
    "data.completion_column": "c",
    "data.instruction_column": "i",
    "data.input_column": "x",
    "data.output_column": "o",
    "data.messages_column": "messages",
    "data.system_prompt": "be brief",
    "data.chat_template": "chatml",
    "data.train_on": ["answers"],
    "data.max_validation_examples": 10,
    "method.target_modules": ["q_proj"],
    "method.modules_to_save": ["score"],
    "method.quantization": {},
    "train.scheduler.warmup_steps": 1,
    "train.eval_every": 5,
    "preference.beta": 0.2,
}


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _contexts():
    """Valid recipes covering each condition of APPLIES both ways."""
    for layout, method, train, split, merge in itertools.product(
        LAYOUTS.values(), METHODS, TRAINS, SPLITS, MERGES
    ):
        m = _deep_merge(BASE, layout)
        m = _deep_merge(m, {"method": method, "train": train, "data": split, "merge": merge})
        try:
            yield m, recipe_from_mapping(copy.deepcopy(m))
        except RecipeError:
            continue


CONTEXTS = list(_contexts())


def _default(key: str):
    from ftcli.recipe.suggest import _section_at

    *parent, leaf = key.split(".")
    field = _section_at(tuple(parent)).model_fields[leaf]
    if key in SAMPLES:
        return SAMPLES[key]
    value = field.get_default(call_default_factory=True)
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    assert value is not None, f"{key}: add a sample value to SAMPLES in {__file__}"
    return list(value) if isinstance(value, tuple) else value


def _reported(mapping: dict, key: str, any_message: bool = True) -> str | None:
    """'error', 'warning' or None: how validating ``mapping`` reports ``key`` (with
    ``any_message=False``, only as a key that does nothing: "only applies to ...")."""
    try:
        r = recipe_from_mapping(mapping)
    except RecipeError as exc:
        mine = [
            p for p in exc.problems if p.key == key and (any_message or "only applies" in p.message)
        ]
        return "error" if mine else "other error"
    return "warning" if any(p.key == key for p in r.warnings) else None


def test_every_schema_key_declares_when_it_applies():
    keys = {".".join(k) for k in _all_keys()}
    missing = sorted(keys - set(APPLIES))
    assert not missing, (
        "recipe keys with no entry in ftcli.recipe.APPLIES: "
        + ", ".join(missing)
        + ' (add "KEY": ALWAYS if the key changes every run, or '
        '"KEY": Applies(lambda r: <when it takes effect>, "<what it applies to>") so that '
        "setting it where it does nothing is reported)"
    )
    stale = sorted(set(APPLIES) - keys)
    assert not stale, f"APPLIES names keys the schema does not have: {stale}"


@pytest.mark.parametrize("key", sorted(k for k, v in APPLIES.items() if v is not None))
def test_a_key_set_where_it_does_nothing_is_reported(key):
    rule = APPLIES[key]
    value = _default(key)
    tried_off = tried_on = 0
    for mapping, recipe in CONTEXTS:
        applies = rule.when(recipe)
        m = copy.deepcopy(mapping)
        assert not apply_overrides(m, [(tuple(key.split(".")), copy.deepcopy(value))])
        got = _reported(m, key, any_message=not applies)
        if applies:
            # setting it where it applies is accepted (another key may still object to the value)
            assert got not in ("error", "warning"), f"{key} reported where it applies: {m}"
            tried_on += 1
        elif got in ("error", "warning"):
            # the nearest semantic check may already name it as an error, never silently
            assert got == "error" or rule.warn, f"{key}: expected an error, got a warning"
            tried_off += 1
    assert tried_off, f"{key}: no context where it does not apply was reported: add one to the test"
    assert tried_on, f"{key}: no context where it applies: add one to the test"


@pytest.mark.parametrize(
    "sets, key, kind",
    [
        (
            {"train": {"scheduler": {"name": "plateau", "warmup_steps": 3}}},
            "train.scheduler.warmup_steps",
            "error",
        ),
        (
            {"method": {"kind": "qlora", "quantization": {"bits": 8, "double_quant": True}}},
            "method.quantization.double_quant",
            "error",
        ),
        (
            {"method": {"kind": "qlora", "quantization": {"bits": 8, "compute_dtype": "float32"}}},
            "method.quantization.compute_dtype",
            "error",
        ),
        ({"method": {"kind": "full"}, "merge": {"dtype": "bfloat16"}}, "merge.dtype", "error"),
        ({"method": {"kind": "full"}, "merge": {"into": "original"}}, "merge.into", "error"),
        (
            {"train": {"scheduler": {"name": "linear", "factor": 0.3}}},
            "train.scheduler.factor",
            "error",
        ),
        ({"data": {"loss_on": "all"}}, "data.loss_on", "warning"),
        ({"data": {"add_eos": False}}, "data.add_eos", "warning"),
        ({"eval": {"max_new_tokens": 8}}, "eval.max_new_tokens", "warning"),
        ({"eval": {"generate_examples": 8}}, "eval.generate_examples", "warning"),
        (
            {"train": {"optimizer": {"name": "sgd", "betas": [0.8, 0.9]}}},
            "train.optimizer.betas",
            "warning",
        ),
        ({"train": {"optimizer": {"name": "sgd", "eps": 1e-6}}}, "train.optimizer.eps", "warning"),
        (
            {"train": {"optimizer": {"name": "adamw", "momentum": 0.5}}},
            "train.optimizer.momentum",
            "warning",
        ),
    ],
)
def test_the_keys_a_new_user_set_in_vain_are_named(sets, key, kind):
    m = _deep_merge(_deep_merge(BASE, LAYOUTS["classification"]), {"method": {"kind": "lora"}})
    assert _reported(_deep_merge(m, sets), key) == kind


def test_warnings_are_printed_by_validate(tmp_path, capsys):
    import yaml

    from ftcli.cli import main

    m = _deep_merge(_deep_merge(BASE, LAYOUTS["classification"]), {"method": {"kind": "lora"}})
    m["eval"] = {"max_new_tokens": 8}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(m))
    for strict, code in (([], 0), (["--strict"], 1)):
        with pytest.raises(SystemExit) as exc:
            main(["validate", str(path), "--no-data", *strict])
        assert exc.value.code == code
        err = capsys.readouterr().err
        assert (
            "eval.max_new_tokens: only applies to task causal_lm or preference; ignored in this run"
            in err
        )
