"""Issue 9's strategies: the default learning rate per method, the optimizer groups (LoRA+,
layer_decay) and the unfreezing schedule. (The recipe keys' checks are tests/unit/recipe/.)"""

from __future__ import annotations

import pytest
import torch

from ftcli.recipe import recipe_from_mapping
from ftcli.strategies import DEFAULT_LR, Unfreezing, learning_rate, param_groups
from tests.unit.recipe.samples import mapping


def test_default_learning_rate_follows_the_method_unless_set():
    r = recipe_from_mapping(mapping({"kind": "prefix"}))
    assert learning_rate(r) == (5e-3, "the default for method.kind prefix")
    r = recipe_from_mapping(mapping({"kind": "lora"}))
    assert learning_rate(r) == (DEFAULT_LR["lora"], "the default for method.kind lora")
    r = recipe_from_mapping(mapping({"kind": "prefix"}, {"optimizer": {"lr": 1.0e-3}}))
    assert learning_rate(r) == (1e-3, "train.optimizer.lr")


# --------------------------------------------------------------------------- optimizer groups


class Blocks(torch.nn.Module):
    """Named like a transformer: embeddings, layers.0..2 with lora_A/lora_B, a classifier."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 4)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"lora_A": torch.nn.Linear(4, 2), "lora_B": torch.nn.Linear(2, 4)})
            for _ in range(3)
        )
        self.classifier = torch.nn.Linear(4, 2)
        self.config = type("C", (), {"num_hidden_layers": 3})()


def _lrs(recipe, model):
    groups = param_groups(recipe, model, 3)
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["lr"] for g in groups for p in g["params"]}


def test_lora_plus_gives_b_ratio_times_the_lr_of_a():
    r = recipe_from_mapping(mapping(train={"optimizer": {"lr": 1.0e-3, "lora_plus_ratio": 16}}))
    lrs = _lrs(r, Blocks())
    assert lrs["layers.1.lora_A.weight"] == pytest.approx(1e-3)
    assert lrs["layers.1.lora_B.weight"] == pytest.approx(16e-3)
    assert lrs["classifier.weight"] == pytest.approx(1e-3)


def test_layer_decay_rates_per_block_head_top_embeddings_bottom():
    r = recipe_from_mapping(mapping(train={"optimizer": {"lr": 1.0e-3, "layer_decay": 0.5}}))
    lrs = _lrs(r, Blocks())
    assert lrs["classifier.weight"] == pytest.approx(1e-3)
    assert lrs["layers.2.lora_A.weight"] == pytest.approx(1e-3)  # top block
    assert lrs["layers.1.lora_A.weight"] == pytest.approx(0.5e-3)
    assert lrs["layers.0.lora_A.weight"] == pytest.approx(0.25e-3)
    assert lrs["embed_tokens.weight"] == pytest.approx(0.25e-3)  # the bottom rate
    # and the optimizer really uses them
    from ftcli.train import build_optimizer

    opt = build_optimizer(r, Blocks())
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.25e-3, 0.5e-3, 1e-3])


def test_unfreezing_is_a_pure_function_of_the_step():
    model = Blocks()
    names = [n for n, _ in model.named_parameters()]
    waiting = {n: int(n.split(".")[1]) for n in names if n.startswith("layers.")}
    waiting["embed_tokens.weight"] = 0
    u = Unfreezing((2, 1, 0), waiting, start=1, every=5)
    counts = [u.apply(model, step) for step in (0, 4, 5, 9, 10, 100)]
    head, block = 4 * 2 + 2, 4 * 2 + 2 + 2 * 4 + 4
    assert (
        counts
        == [head + block, head + block, head + 2 * block, head + 2 * block]
        + [head + 3 * block + 40] * 2
    )
    assert u.apply(model, 7) == u.apply(Blocks(), 7)  # no hidden state: resume lands the same
    assert not model.layers[0].lora_A.weight.requires_grad or u.open_blocks(7) == 3
