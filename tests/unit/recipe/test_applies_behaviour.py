"""Behaviour behind the APPLIES table (trust item 11): for keys the table marks ALWAYS without a
check of their own, two values must change something observable at the boundary the key reaches:
the kwargs passed to transformers' from_pretrained, the split asked of datasets, the checkpoint
folders a run keeps, whether the model is compiled. test_applies.py checks the table's shape;
these check that the keys do what the table claims."""

from __future__ import annotations

import copy
import types

import pytest
import transformers

from ftcli.recipe import recipe_from_mapping
from tests.unit.recipe.samples import BASE


class _Stop(Exception):
    """Raised by the recording from_pretrained: the kwargs are what the test needs."""


def _from_pretrained_kwargs(monkeypatch, model: dict) -> dict:
    """The kwargs load_recipe_base hands transformers for a recipe with this ``model`` section."""
    from ftcli.models import load_recipe_base
    from ftcli.sources import trusting

    seen = {}

    def record(cls, path, **kwargs):
        seen.update(kwargs, path=path)
        raise _Stop

    monkeypatch.setattr(
        transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(record)
    )
    m = copy.deepcopy(BASE)
    m["model"] = {"name": "m", **model}
    r = recipe_from_mapping(m)
    tok = types.SimpleNamespace(pad_token_id=0)
    # as train_run does: the user's own recipe is what allows a model's code to run
    with trusting(r.model.trust_remote_code), pytest.raises(_Stop):
        load_recipe_base(r, "/some/folder", ["neg", "pos"], tok, "cpu")
    return seen


@pytest.mark.parametrize(
    ("key", "a", "b", "kwarg"),
    [
        ("revision", "main", "v1.0", "revision"),
        ("trust_remote_code", False, True, "trust_remote_code"),
        ("attn_implementation", "eager", "sdpa", "attn_implementation"),
    ],
)
def test_model_keys_reach_from_pretrained(monkeypatch, key, a, b, kwarg):
    first = _from_pretrained_kwargs(monkeypatch, {key: a})
    second = _from_pretrained_kwargs(monkeypatch, {key: b})
    assert (first[kwarg], second[kwarg]) == (a, b)


def test_trust_remote_code_from_a_record_alone_is_refused(monkeypatch):
    """Outside the recipe's own run (no trusting context), asking for remote code is an error."""
    from ftcli.errors import FtcliError
    from ftcli.models import load_recipe_base

    m = copy.deepcopy(BASE)
    m["model"] = {"name": "m", "trust_remote_code": True}
    tok = types.SimpleNamespace(pad_token_id=0)
    with pytest.raises(FtcliError, match="asks to run its own Python code"):
        load_recipe_base(recipe_from_mapping(m), "/some/folder", ["neg", "pos"], tok, "cpu")


def test_attn_implementation_unset_leaves_transformers_default(monkeypatch):
    assert "attn_implementation" not in _from_pretrained_kwargs(monkeypatch, {})


def test_hub_split_is_the_split_asked_of_datasets(monkeypatch):
    import datasets

    from ftcli.data.read import _read_hub

    asked = []

    def load_dataset(hub_id, subset, split):
        asked.append((hub_id, subset, split))
        return types.SimpleNamespace(to_list=lambda: [{"text": split, "label": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for split in ("train", "validation"):
        m = copy.deepcopy(BASE)
        m["data"] = {"path": "org/ds", "label_column": "label", "hub_split": split}
        rows = _read_hub("org/ds", recipe_from_mapping(m).data)
        assert rows == [{"text": split, "label": "a"}]
    assert asked == [("org/ds", None, "train"), ("org/ds", None, "validation")]


def test_keep_checkpoints_and_compile_change_a_real_run(
    tmp_path, tiny_models, tiny_data, monkeypatch
):
    """Two tiny runs (3 steps, a checkpoint each step): keep_checkpoints 1 vs 2 leaves 1 vs 2
    step folders; compile false vs true calls Module.compile never vs on the model trained (the
    call is recorded, not run: inductor on a CPU takes minutes)."""
    import torch

    from ftcli.pipeline import train_run
    from ftcli.ui import UI
    from tests.conftest import tiny_recipe

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    kept, calls = {}, {}
    for keep, compile_ in ((1, False), (2, True)):
        m = tiny_recipe(tmp_path / f"k{keep}", tiny_models, tiny_data)
        m["train"].update(max_steps=3, checkpoint_every=1, keep_checkpoints=keep, compile=compile_)
        m["eval"]["batch_size"] = 64
        m["merge"] = {"enabled": False}
        r = recipe_from_mapping(m)
        compiled.clear()
        train_run(r, UI(), memory_check=False)
        kept[keep] = sorted(p.name for p in (r.run_dir / "checkpoints").glob("step-*"))
        calls[compile_] = len(compiled)
    # the last step's weights go to model/; the checkpoints before it are pruned to the newest N
    assert kept == {1: ["step-0000002"], 2: ["step-0000001", "step-0000002"]}
    assert calls[False] == 0 and calls[True] >= 1
