"""Issue 9 on the tiny models: the built peft configs and module types, adapt-time recipe errors,
gradual unfreezing (counts at the scheduled steps, exact resume), early stopping (stops on a run
built to overfit, keeps the best step's weights), the MLP head, and PiSSA's original base."""

from __future__ import annotations

import csv
import json
import random
import shutil

import pytest
import torch
from peft import PeftModelForSequenceClassification
from peft.tuners import ia3, lora, vera
from safetensors.torch import load_file

from ftcli.adapt import adapt
from ftcli.errors import RecipeError
from ftcli.forward import loss_sums
from ftcli.models import load_recipe_base, load_tokenizer, load_trained
from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.rundir import open_run
from ftcli.ui import UI
from tests.conftest import tiny_recipe


def _mapping(tmp_path, tiny_models, tiny_data, method, **train):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, kind="full", arch="bert")
    m["method"] = method
    m["merge"] = {}
    m["train"].update(train)
    return m


def _adapt(recipe):
    tok, _, model_dir = load_tokenizer(recipe.model)
    return adapt(recipe, tok, model_dir, ["neg", "pos"], "cpu")


@pytest.mark.parametrize(
    "method, check",
    [
        (
            {"kind": "lora", "r": 4, "dora": True, "target_modules": ["query"]},
            lambda cfg, model: (
                cfg.use_dora
                and any(isinstance(m, lora.dora.DoraLinearLayer) for m in model.modules())
            ),
        ),
        (
            {"kind": "lora", "r": 4, "alpha": 8, "rslora": True, "target_modules": ["query"]},
            lambda cfg, model: (
                cfg.use_rslora
                and all(
                    m.scaling["default"] == pytest.approx(8 / 2)
                    for m in model.modules()
                    if isinstance(m, lora.LoraLayer)
                )
            ),
        ),
        (
            {"kind": "lora", "r": 4, "init": "olora", "target_modules": ["query"]},
            lambda cfg, model: cfg.init_lora_weights == "olora",
        ),
        (
            {"kind": "lora", "r": 4, "layers": [1], "target_modules": ["query", "value"]},
            lambda cfg, model: (
                cfg.layers_to_transform == [1]
                and sorted(n for n, m in model.named_modules() if isinstance(m, lora.Linear))
                == [
                    "base_model.model.bert.encoder.layer.1.attention.self.query",
                    "base_model.model.bert.encoder.layer.1.attention.self.value",
                ]
            ),
        ),
        (
            {"kind": "ia3"},
            lambda cfg, model: (
                sum(isinstance(m, ia3.Linear) for m in model.modules()) == 8
                and set(cfg.feedforward_modules) == {"output.dense"}
            ),
        ),
        (
            {"kind": "vera", "r": 4, "target_modules": ["query", "value"]},
            lambda cfg, model: (
                cfg.r == 4 and sum(isinstance(m, vera.Linear) for m in model.modules()) == 4
            ),
        ),
        (
            {"kind": "prompt", "num_virtual_tokens": 5},
            lambda cfg, model: (
                type(cfg).__name__ == "PromptTuningConfig"
                and cfg.num_virtual_tokens == 5
                and isinstance(model, PeftModelForSequenceClassification)
            ),
        ),
        (
            {"kind": "ptuning"},
            lambda cfg, model: (
                type(cfg).__name__ == "PromptEncoderConfig" and cfg.num_virtual_tokens == 20
            ),
        ),
    ],
    ids=["dora", "rslora", "olora", "layers", "ia3", "vera", "prompt", "ptuning"],
)
def test_each_variant_reaches_peft(tmp_path, tiny_models, tiny_data, method, check):
    recipe = recipe_from_mapping(_mapping(tmp_path, tiny_models, tiny_data, method))
    adapted = _adapt(recipe)
    assert check(adapted.model.peft_config["default"], adapted.model)
    lines = adapted.counts.lines(recipe)
    assert lines[0].startswith("trainable ") and lines[-1].startswith("learning rate ")


def test_adapt_lines_give_each_strategys_arithmetic(tmp_path, tiny_models, tiny_data):
    r = recipe_from_mapping(
        _mapping(tmp_path, tiny_models, tiny_data, {"kind": "prompt", "num_virtual_tokens": 5})
    )
    lines = _adapt(r).counts.lines(r)
    assert "prompt tuning: 5 virtual tokens x 32 = 160; every sequence is 5 tokens longer" in lines
    assert lines[-1] == "learning rate 0.005 (the default for method.kind prompt)" or "lr" in str(
        r.train.optimizer.model_fields_set
    )
    r = recipe_from_mapping(
        _mapping(tmp_path, tiny_models, tiny_data, {"kind": "lora", "r": 4, "dora": True})
    )
    lines = _adapt(r).counts.lines(r)
    assert "  each query 32x32: 288 of 1,024 weights = 4 x (32 + 32) + 32 magnitudes" in lines


def test_layers_out_of_range_and_freeze_patterns_that_match_nothing(
    tmp_path, tiny_models, tiny_data
):
    r = recipe_from_mapping(
        _mapping(tmp_path, tiny_models, tiny_data, {"kind": "lora", "layers": [1, 2]})
    )
    with pytest.raises(RecipeError) as info:
        _adapt(r)
    assert [p.render() for p in info.value.problems] == [
        "<recipe>: method.layers: block 2 is out of range: BertForSequenceClassification has 2 "
        "blocks (0 to 1) (name blocks between 0 and 1)"
    ]
    r = recipe_from_mapping(
        _mapping(tmp_path, tiny_models, tiny_data, {"kind": "full", "freeze": ["embedings"]})
    )
    with pytest.raises(RecipeError) as info:
        _adapt(r)
    assert [p.render() for p in info.value.problems] == [
        "<recipe>: method.freeze: 'embedings' matches no parameter of "
        "BertForSequenceClassification (parameter names start with: bert.embeddings, "
        "bert.encoder, bert.pooler, classifier)"
    ]


@pytest.mark.parametrize("arch", ["bert", "llama-random"])
def test_prefix_tuning_of_a_classifier_is_refused_before_the_weights_load(
    tmp_path, tiny_models, tiny_data, monkeypatch, arch
):
    """An encoder takes no past key values; a transformers 5 decoder calls them `cache`, which
    peft's classifier path does not accept (it raised at the first training step before)."""
    import ftcli.adapt

    m = _mapping(tmp_path, tiny_models, tiny_data, {"kind": "prefix"})
    m["model"]["name"] = str(tiny_models[arch])
    r = recipe_from_mapping(m)
    monkeypatch.setattr(ftcli.adapt, "load_recipe_base", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(RecipeError) as info:
        _adapt(r)
    cls = {
        "bert": "BertForSequenceClassification",
        "llama-random": "LlamaForSequenceClassification",
    }
    assert [p.render() for p in info.value.problems] == [
        "<recipe>: method.kind: prefix tuning of a classifier needs a forward that takes "
        f"past_key_values (peft looks for that name); {cls[arch]} does not (use kind prompt or "
        "ptuning (they prepend to the input embeddings), or prefix tuning with task causal_lm)"
    ]


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gradual_unfreezing_follows_the_schedule_and_resumes_exactly(
    tmp_path, tiny_models, tiny_data
):
    m = _mapping(
        tmp_path,
        tiny_models,
        tiny_data,
        {"kind": "full"},
        max_steps=6,
        log_every=1,
        checkpoint_every=3,
        unfreeze={"every_steps": 2, "start_layers": 0},
    )
    r = recipe_from_mapping(m)
    train_run(r, UI())
    rows = [x for x in _metrics(r.run_dir) if "loss" in x]
    counts = [x["trainable"] for x in rows]
    # steps 1-2: head (+ pooler); 3-4: + top block; 5-6: + bottom block and the embeddings
    assert counts[0] == counts[1] < counts[2] == counts[3] < counts[4] == counts[5]
    model = load_recipe_base(
        r, str(tiny_models["bert"]), ["neg", "pos"], load_tokenizer(r.model)[0], "cpu"
    )
    n = {k: p.numel() for k, p in model.named_parameters()}
    head = sum(v for k, v in n.items() if k.startswith(("classifier", "bert.pooler")))
    block1 = sum(v for k, v in n.items() if ".layer.1." in k)
    assert counts[0] == head and counts[2] == head + block1 and counts[4] == sum(n.values())
    # the bottom block and embeddings never moved before their turn: resume from step 3 repeats
    # steps 4-6 exactly
    first = load_file(str(r.run_dir / "model" / "model.safetensors"))
    first_rows = rows
    shutil.rmtree(r.run_dir / "model")
    out = train_run(r, UI(), resume=True)
    assert out["train"]["resumed_from"] == 3
    again = load_file(str(r.run_dir / "model" / "model.safetensors"))
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=1e-6, msg=k)
    rows = [x for x in _metrics(r.run_dir) if "loss" in x]
    assert [x["trainable"] for x in rows] == counts
    assert [round(x["loss"], 5) for x in rows] == [round(x["loss"], 5) for x in first_rows]


def _noise_data(path, n=60):
    """Labels that no text predicts: validation loss rises as soon as training memorises."""
    rng = random.Random(3)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        for i in range(n):
            words = " ".join(rng.choice(["good", "bad", "film", "plot", "dull"]) for _ in range(5))
            w.writerow({"text": f"{words} {i}", "label": rng.choice(["pos", "neg"])})
    return path


def test_early_stopping_stops_and_keeps_the_best_steps_weights(tmp_path, tiny_models, tiny_data):
    m = _mapping(
        tmp_path,
        tiny_models,
        tiny_data,
        {"kind": "full"},
        epochs=40,
        batch_size=8,
        eval_every=1,
        log_every=1,
        optimizer={"name": "adamw", "lr": 3.0e-3},
        early_stopping={"patience": 3, "min_delta": 0.0},
    )
    m["data"]["path"] = str(_noise_data(tmp_path / "noise.csv"))
    m["data"]["split"] = {"validation": 0.3, "test": 0.2, "seed": 0}
    r = recipe_from_mapping(m)
    out = train_run(r, UI())
    t = out["train"]
    vals = [(x["step"], x["val_loss"]) for x in _metrics(r.run_dir) if "val_loss" in x]
    total = 40 * 5  # 60 x 0.5 = 30 training rows, 4 batches of 8 per epoch
    assert t["stopped_at"] is not None and t["stopped_at"] < total
    assert t["stopped_at"] == vals[-1][0] and t["best_step"] == t["best_val_step"]
    best_step, best = min(vals, key=lambda v: v[1])
    assert best_step == t["best_step"] and len([s for s, _ in vals if s > best_step]) == 3
    # the saved model is the best step's: its validation loss is the best one, not the last
    rd = open_run(r.run_dir)
    model, tok = load_trained(r.run_dir, r.task)
    from ftcli.data.tokenize import collate, tokenize

    feats = tokenize(rd.prepared.splits["validation"], r, tok, rd.prepared.label2id).features
    with torch.no_grad():
        s, c = loss_sums(model, collate(feats, tok.pad_token_id), r.task)
    assert float(s / c) == pytest.approx(best, abs=1e-5)
    assert float(s / c) < vals[-1][1]


def test_mlp_head_trains_saves_and_merges(tmp_path, tiny_models, tiny_data):
    m = _mapping(
        tmp_path,
        tiny_models,
        tiny_data,
        {"kind": "lora", "r": 4, "target_modules": ["query", "value"]},
        max_steps=18,
        log_every=1,
        optimizer={"name": "adamw", "lr": 1.0e-2},
    )
    m["model"]["head"] = {"hidden": 16, "dropout": 0.1}
    r = recipe_from_mapping(m)
    out = train_run(r, UI())
    # The random tiny BERT stays near chance loss whatever its head (0.686 -> 0.689 over 18
    # steps, and over 48): a falling-loss check here passed or failed by batch order. That the
    # head trains is checked on its weights below (they left their recorded init).
    assert len([x for x in _metrics(r.run_dir) if "loss" in x]) == 18
    init = load_file(str(r.run_dir / "init" / "head.safetensors"))
    assert sorted(init) == [
        "classifier.0.bias",
        "classifier.0.weight",
        "classifier.3.bias",
        "classifier.3.weight",
    ]
    merged = r.run_dir / "merged"
    assert out["merge"]["saved_check"]["passed"]
    model, _ = load_trained(r.run_dir, r.task)
    assert isinstance(model.classifier, torch.nn.Sequential)
    w = load_file(str(merged / "model.safetensors"))["classifier.0.weight"]
    assert not torch.equal(w, init["classifier.0.weight"])  # the head trained
    torch.testing.assert_close(model.classifier[0].weight, w)


def test_pissa_adapter_is_relative_to_the_original_base(tmp_path, tiny_models, tiny_data):
    m = _mapping(
        tmp_path,
        tiny_models,
        tiny_data,
        {"kind": "lora", "r": 4, "init": "pissa", "target_modules": ["query", "value"]},
        max_steps=6,
        optimizer={"name": "adamw", "lr": 1.0e-2},
    )
    r = recipe_from_mapping(m)
    out = train_run(r, UI())
    cfg = json.loads((r.run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # converted: a plain rank-2r delta
    assert out["merge"]["fold_check"]["passed"] and out["merge"]["saved_check"]["passed"]
    # eval --baseline scores the untouched pre-trained base, not PiSSA's residual
    from ftcli.evaluation.baseline import load_base

    tok = load_tokenizer(r.model)[0]
    base, _ = load_base(r, r.run_dir, ["neg", "pos"], tok, "cpu")
    original = load_file(str(tiny_models["bert"] / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    got = dict(base.named_parameters())[f"bert.{key}"]
    original = original.get(key, original.get(f"bert.{key}"))
    torch.testing.assert_close(got, original, rtol=0, atol=0)


@pytest.mark.parametrize(
    "method",
    [
        {"kind": "lora", "r": 4, "dora": True, "layers": [1]},
        {"kind": "ia3"},
        {"kind": "vera", "r": 4, "target_modules": ["query", "value"]},
        {"kind": "prompt", "num_virtual_tokens": 6},
        {"kind": "full", "layers": [1], "freeze": ["LayerNorm"]},
    ],
    ids=["dora-layers", "ia3", "vera", "prompt", "full-layers"],
)
def test_memory_estimate_counts_each_strategys_trainable_weights(
    tmp_path, tiny_models, tiny_data, method
):
    from ftcli.memory import plan_recipe

    r = recipe_from_mapping(_mapping(tmp_path, tiny_models, tiny_data, method))
    plan = plan_recipe(r, "cpu")
    assert plan.inv.trainable == _adapt(r).counts.trainable
    # virtual tokens lengthen every sequence the estimate plans for
    assert plan.setup.seq_len == r.data.max_length + r.method.virtual_tokens


def test_gradual_unfreezing_with_lora_keeps_waiting_adapters_frozen(
    tmp_path, tiny_models, tiny_data
):
    """LoRA under the schedule: the bottom block's adapters join at step 3, and until then they
    do not move (a 2-step run never reaches their turn)."""
    method = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}
    weights, counts = {}, None
    for steps in (2, 4):
        m = _mapping(
            tmp_path / str(steps),
            tiny_models,
            tiny_data,
            method,
            max_steps=steps,
            log_every=1,
            unfreeze={"every_steps": 2, "start_layers": 1},
            optimizer={"name": "adamw", "lr": 1.0e-2},
        )
        m["merge"] = {"enabled": False}
        r = recipe_from_mapping(m)
        assert train_run(r, UI())["status"] == "completed"
        weights[steps] = load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors"))
        counts = [x["trainable"] for x in _metrics(r.run_dir) if "loss" in x]
    # steps 1-2: head + the top block's adapters; 3-4: + the bottom block's
    per_block = 2 * (4 * 32 + 32 * 4)  # query and value: A (4 x 32) and B (32 x 4)
    assert counts[0] == counts[1] and counts[2] == counts[3] == counts[0] + per_block
    # LoRA B starts at zero, and one AdamW step on a trainable B moves it by about lr
    top = [k for k in weights[2] if "layer.1." in k and "lora_B" in k]
    bottom = [k for k in weights[2] if "layer.0." in k and "lora_B" in k]
    assert top and bottom
    assert all(weights[2][k].abs().max() > 1e-3 for k in top)
    assert all(torch.equal(weights[2][k], torch.zeros_like(weights[2][k])) for k in bottom)
    assert all(weights[4][k].abs().max() > 1e-3 for k in bottom)


@pytest.mark.parametrize("kind", ["dora", "ia3", "vera", "prefix", "prompt", "ptuning"])
def test_predict_and_generate_with_each_kind(tmp_path, tiny_models, tiny_data, kind):
    """`ftcli predict` / chat's predictor load every kind from its run folder: class probabilities
    equal the trained model's own, and a causal LM answers."""
    from ftcli.data.tokenize import tokenize
    from ftcli.forward import class_probabilities
    from ftcli.serve.predictor import load_predictor

    method = {
        "dora": {"kind": "lora", "r": 4, "dora": True, "target_modules": ["q_proj", "v_proj"]},
        "vera": {"kind": "vera", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    }.get(kind, {"kind": kind})
    texts = ["the film was really good", "a dull and boring plot", "awful"]
    # prefix tuning has no classifier path under transformers 5 (the test above): chat only
    for task in ("causal_lm",) if kind == "prefix" else ("classification", "causal_lm"):
        arch = "llama-random" if task == "classification" else "llama"
        m = tiny_recipe(tmp_path / task, tiny_models, tiny_data, task=task, kind="full", arch=arch)
        m.update(method=dict(method), merge={"enabled": False})
        m["train"].update(max_steps=3, optimizer={"name": "adamw", "lr": 1.0e-2})
        r = recipe_from_mapping(m)
        train_run(r, UI())
        p = load_predictor(str(r.run_dir))
        if task == "causal_lm":
            answers = p.generate([[{"role": "user", "content": "what is 3 plus 4 ?"}]], 8)
            assert len(answers) == 1 and isinstance(answers[0], str)
            continue
        got = [x["probs"]["pos"] for x in p.classify(texts)]
        model, tok = load_trained(r.run_dir, task)
        rows = [{"text": t, "label": "pos"} for t in texts]
        feats = tokenize(rows, r, tok, {"neg": 0, "pos": 1}).features
        want = [x[1] for x in class_probabilities(model, feats, tok.pad_token_id, 8, "cpu")]
        assert got == pytest.approx(want, abs=1e-5)
