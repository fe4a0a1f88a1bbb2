"""The preference section (issue 23): its defaults per loss, and every key set where it does
nothing is one error that names the key and the loss; the memory estimate counts the doubled
sequences and the reference model (none for the disabled adapter or a precomputed reference)."""

from __future__ import annotations

import copy

import pytest

from ftcli.errors import RecipeError
from ftcli.recipe import load_recipe, recipe_from_mapping

BASE = {
    "name": "pref",
    "task": "preference",
    "model": {"name": "some/model"},
    "data": {"path": "pairs.jsonl"},
    "method": {"kind": "lora"},
}


def _load(**sections):
    m = copy.deepcopy(BASE)
    for k, v in sections.items():
        m[k] = v if not isinstance(v, dict) else {**m.get(k, {}), **v}
    return recipe_from_mapping(m)


def _problems(**sections) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as exc:
        _load(**sections)
    return [(p.key, p.message) for p in exc.value.problems]


def test_defaults_follow_the_loss():
    assert _load().preference.beta_value == 0.1
    assert _load(preference={"loss": "simpo"}).preference.beta_value == 2.0
    assert _load(preference={"loss": "kto", "beta": 0.3}).preference.beta_value == 0.3
    assert _load(preference={"loss": "orpo", "lambda": 0.2}).preference.lambda_ == 0.2


@pytest.mark.parametrize(
    "loss, key, value, named",
    [
        ("simpo", "reference", "runs/sft", "simpo uses no reference model"),
        ("orpo", "reference", "start", "orpo uses no reference model"),
        ("orpo", "precompute_reference", True, "orpo uses no reference model"),
        ("simpo", "precompute_reference", True, "simpo uses no reference model"),
        ("dpo", "gamma", 1.0, "only applies to preference.loss simpo, not to dpo"),
        ("ipo", "label_smoothing", 0.1, "only applies to preference.loss dpo, not to ipo"),
        ("dpo", "lambda", 0.2, "only applies to preference.loss orpo, not to dpo"),
        ("orpo", "beta", 0.2, "not to orpo"),
        ("dpo", "desirable_weight", 2.0, "only applies to preference.loss kto, not to dpo"),
        ("simpo", "undesirable_weight", 2.0, "only applies to preference.loss kto, not to simpo"),
    ],
)
def test_a_key_its_loss_does_not_read_is_an_error_naming_both(loss, key, value, named):
    found = _problems(preference={"loss": loss, key: value})
    assert found == [(f"preference.{key}", found[0][1])] and named in found[0][1]


@pytest.mark.parametrize("task", ["causal_lm", "classification", "reward"])
def test_the_section_on_another_task_is_an_error(task):
    extra = {"data": {"label_column": "label"}} if task == "classification" else {}
    found = _problems(task=task, preference={"loss": "dpo"}, **extra)
    assert [k for k, _ in found] == ["preference"]


def test_what_pair_training_cannot_do_is_refused():
    assert any(
        k == "train.batch_size"
        for k, _ in _problems(preference={"loss": "kto"}, train={"batch_size": 1})
    )
    assert any(k == "data.packing" for k, _ in _problems(data={"packing": True}))
    assert any(
        k == "data.streaming"
        for k, _ in _problems(data={"streaming": True}, train={"max_steps": 5})
    )
    found = _problems(method={"kind": "lora", "init": "pissa"})
    assert [k for k, _ in found] == ["method.init"] and "reference" in found[0][1]
    # a named reference, or a loss without one, does not read the disabled adapter
    _load(method={"kind": "lora", "init": "pissa"}, preference={"reference": "some/model"})
    _load(method={"kind": "lora", "init": "pissa"}, preference={"loss": "simpo"})


def test_bad_values_are_refused():
    assert any("label_smoothing" in k for k, _ in _problems(preference={"label_smoothing": 0.5}))
    assert any("beta" in k for k, _ in _problems(preference={"beta": 0}))
    assert any("loss" in k for k, _ in _problems(preference={"loss": "rlhf"}))


@pytest.mark.parametrize("kind", ["full", "lora", "qlora", "ia3", "prompt"])
def test_every_method_kind_validates_for_both_tasks(kind):
    _load(method={"kind": kind})
    _load(task="reward", method={"kind": kind})


def test_to_yaml_round_trips_with_the_keys_of_its_loss(tmp_path):
    for pref in (
        {"loss": "orpo", "lambda": 0.3},
        {"loss": "dpo", "label_smoothing": 0.1},
        {"loss": "kto"},
    ):
        r = _load(preference=pref)
        text = r.to_yaml()
        path = tmp_path / "r.yaml"
        path.write_text(text)
        again = load_recipe(path)
        # the loss's default beta is written out: the same value, now set
        assert again.preference.beta_value == r.preference.beta_value
        assert again.preference.model_dump(exclude={"beta"}) == r.preference.model_dump(
            exclude={"beta"}
        )
    assert "lambda: 0.3" in _load(preference={"loss": "orpo", "lambda": 0.3}).to_yaml()
    assert "gamma" not in _load().to_yaml() and "beta: 0.1" in _load().to_yaml()
    assert "preference" not in _load(task="reward").to_yaml()


# --------------------------------------------------------------------------- estimate-memory


def test_estimate_counts_the_doubled_sequences_and_the_reference(tiny_models):
    from ftcli.memory.plan import plan_recipe

    def total(**sections):
        m = copy.deepcopy(BASE)
        m["model"]["name"] = str(tiny_models["llama"])
        m["data"]["max_length"] = 64
        m["train"] = {"batch_size": 4, "mixed_precision": "no"}
        for k, v in sections.items():
            m[k] = {**m.get(k, {}), **v} if isinstance(v, dict) else v
        plan = plan_recipe(recipe_from_mapping(m), device="cpu")
        e = plan.estimate()
        return plan.setup, e

    _, sft = total(task="causal_lm")
    lora_setup, lora = total()
    assert lora_setup.batch_size == 8 and not lora_setup.reference_copy  # 4 pairs = 8 sequences
    assert lora.acts.stored > sft.acts.stored
    pre_setup, _ = total(preference={"precompute_reference": True})
    assert not pre_setup.reference_copy
    named_setup, named = total(preference={"reference": str(tiny_models["llama"])})
    assert named_setup.reference_copy and named.weights["total"] > lora.weights["total"]
    full_setup, full = total(method={"kind": "full"})
    assert full_setup.reference_copy and "reference model" in full.weights["by_precision"]
    full_pre_setup, full_pre = total(
        method={"kind": "full"}, preference={"precompute_reference": True}
    )
    assert not full_pre_setup.reference_copy
    assert full.total > full_pre.total
    assert full.weights["by_precision"]["reference model"] == full_pre.weights["total"]
    kto_setup, _ = total(preference={"loss": "kto"})
    assert kto_setup.batch_size == 4  # KTO rows run once (their KL rows without gradients)
    reward_setup, _ = total(task="reward")
    assert reward_setup.batch_size == 8 and reward_setup.task == "classification"
