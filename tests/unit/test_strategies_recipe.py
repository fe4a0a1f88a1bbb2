"""Issue 9's recipe contract: the strategy keys, their impossible combinations (exact messages),
``extends:`` composition, and the optimizer groups (LoRA+, layer_decay) and unfreezing schedule."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
import yaml

from ftcli.errors import RecipeError
from ftcli.recipe import load_recipe, recipe_from_mapping
from ftcli.strategies import DEFAULT_LR, Unfreezing, learning_rate, param_groups

BASE = {
    "name": "t",
    "task": "classification",
    "model": {"name": "m"},
    "data": {"path": "d.csv", "label_column": "label"},
    "method": {"kind": "lora"},
}


def mapping(method=None, train=None, **top):
    m = copy.deepcopy(BASE)
    if method is not None:
        m["method"] = method
    if train is not None:
        m["train"] = train
    m.update(top)
    return m


def problems(m) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_mapping(m)
    return [p.render().removeprefix("<recipe>: ") for p in info.value.problems]


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


def test_every_new_key_loads_and_round_trips():
    m = mapping(
        {"kind": "lora", "dora": True, "rslora": True, "layers": [0, 1], "r": 4, "alpha": 8},
        {
            "optimizer": {"name": "adamw", "lr": 1.0e-3, "lora_plus_ratio": 16, "layer_decay": 0.8},
            "unfreeze": {"every_steps": 50, "start_layers": 2},
            "early_stopping": {"patience": 3, "min_delta": 0.0},
        },
        model={"name": "m", "head": {"hidden": 256, "dropout": 0.1}},
    )
    r = recipe_from_mapping(m)
    assert r.method.scale == 8 / 2  # rsLoRA: alpha / sqrt(r)
    again = recipe_from_mapping(yaml.safe_load(r.to_yaml()))
    assert again.to_yaml() == r.to_yaml() and again.method == r.method
    for kind in ("ia3", "prefix", "prompt", "ptuning", "vera", "full"):
        r = recipe_from_mapping(mapping({"kind": kind}))
        # no inapplicable key left behind to refuse on reload
        assert recipe_from_mapping(yaml.safe_load(r.to_yaml())).to_yaml() == r.to_yaml()


def test_default_learning_rate_follows_the_method_unless_set():
    r = recipe_from_mapping(mapping({"kind": "prefix"}))
    assert learning_rate(r) == (5e-3, "the default for method.kind prefix")
    r = recipe_from_mapping(mapping({"kind": "lora"}))
    assert learning_rate(r) == (DEFAULT_LR["lora"], "the default for method.kind lora")
    r = recipe_from_mapping(mapping({"kind": "prefix"}, {"optimizer": {"lr": 1.0e-3}}))
    assert learning_rate(r) == (1e-3, "train.optimizer.lr")


# --------------------------------------------------------------------------- extends


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


BASE_YAML = """\
name: base
task: classification
model: {name: m}
data:
  path: d.csv
  label_column: label
method:
  kind: lora
  r: 8
  target_modules: [query, value]
train:
  epochs: 2
  optimizer: {name: adamw, lr: 1.0e-3}
"""


def test_extends_deep_merges_replaces_lists_and_null_removes(tmp_path):
    _write(tmp_path / "base.yaml", BASE_YAML)
    _write(
        tmp_path / "child.yaml",
        """\
        extends: base.yaml
        name: child
        method:
          target_modules: [query]
          dora: true
        train:
          optimizer: {lr: 5.0e-4}
          epochs: null
        """,
    )
    r = load_recipe(tmp_path / "child.yaml", ["train.batch_size=4"])
    assert r.name == "child" and r.method.r == 8 and r.method.dora
    assert r.method.target_modules == ["query"]  # lists replace
    assert r.train.optimizer.lr == 5e-4 and r.train.optimizer.name == "adamw"  # mappings merge
    assert r.train.epochs == 1.0  # null removed the base's 2: the default applies
    assert r.train.batch_size == 4  # --set applies last
    assert "extends" not in yaml.safe_load(r.to_yaml())  # the saved recipe is the flat result


def test_extends_chains_and_errors_name_the_file_the_value_came_from(tmp_path):
    _write(tmp_path / "base.yaml", BASE_YAML)
    _write(tmp_path / "mid.yaml", "extends: base.yaml\nmethod:\n  kind: ia3\n")
    _write(tmp_path / "top.yaml", "extends: mid.yaml\nname: top\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "top.yaml")
    assert [p.render() for p in info.value.problems] == [
        f"{tmp_path}/base.yaml:9: method.r: only applies to lora, qlora and vera, not to "
        "method.kind 'ia3' (remove it, or set method.kind to lora)"
    ]
    _write(tmp_path / "top.yaml", "extends: mid.yaml\nname: top\nmethod: {r: null}\n")
    r = load_recipe(tmp_path / "top.yaml")
    assert r.method.kind == "ia3" and r.name == "top"


def test_extends_cycle_and_missing_parent(tmp_path):
    _write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.yaml")
    a, b = (tmp_path / "a.yaml").resolve(), (tmp_path / "b.yaml").resolve()
    assert [p.render() for p in info.value.problems] == [
        f"{tmp_path}/b.yaml:1: extends: extends forms a cycle: {a} -> {b} -> {a}"
    ]
    _write(tmp_path / "c.yaml", "name: c\nextends: nowhere.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "c.yaml")
    assert [p.render() for p in info.value.problems] == [
        f"{tmp_path}/c.yaml:2: extends: cannot find the recipe 'nowhere.yaml' (a path relative "
        "to this recipe, or a bundled recipe's name) (`ftcli recipes` lists the bundled ones)"
    ]


def test_extends_a_bundled_recipe_by_name(tmp_path):
    _write(tmp_path / "mine.yaml", "extends: quickstart\nname: mine\nmethod: {dora: true}\n")
    r = load_recipe(tmp_path / "mine.yaml")
    assert r.name == "mine" and r.method.dora and r.method.target_modules == ["query", "value"]


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
