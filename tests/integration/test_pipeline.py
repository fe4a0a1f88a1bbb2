"""End-to-end runs of the whole pipeline on tiny models: every method on both tasks, resume after
Ctrl-C, QLoRA that keeps learning after an evaluation pass, and two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftcli.errors import FtcliError, Interrupted
from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, tiny_models, tiny_data, train=None, **kw):
    mapping = tiny_recipe(tmp_path, tiny_models, tiny_data, **kw)
    if train:
        mapping["train"].update(train)
    return recipe_from_mapping(mapping)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_decoder_classifier_learns_with_every_method(tmp_path, tiny_models, tiny_data, kind):
    r = _recipe(
        tmp_path,
        tiny_models,
        tiny_data,
        task="classification",
        kind=kind,
        arch="llama-random",
        train={"epochs": 3, "optimizer": {"name": "adamw", "lr": 1.0e-2}},
    )
    out = train_run(r, UI())
    assert out["status"] == "completed"
    assert out["eval"]["metrics"]["accuracy"] >= 0.8, out["eval"]
    files = {p.name for p in (r.run_dir / ("model" if kind == "full" else "adapter")).iterdir()}
    assert "tokenizer.json" in files and "ftcli.json" in files
    if kind == "full":
        assert out["params"]["trainable"] == out["params"]["total"]
        assert not (r.run_dir / "merged").exists()
    else:
        assert out["params"]["trainable"] < out["params"]["total"] / 2
        assert out["merge"]["passed"] and out["merge"]["relative_diff"] < 1e-4
        assert out["merge"]["prediction_agreement"] == 1.0
        # the new head is trained and saved with the adapter
        weights = load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors"))
        assert any("score" in k for k in weights), list(weights)[:5]
    saved = json.loads((r.run_dir / "run.json").read_text())
    assert (
        saved["versions"]["torch"]
        and saved["seed"] == 0
        and set(saved["timings_s"]) >= {"prepare", "adapt", "train"}
    )
    assert (r.run_dir / "recipe.yaml").exists() and (r.run_dir / "data" / "test.jsonl").exists()


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_encoder_lora_trains_the_head_and_adapter(tmp_path, tiny_models, tiny_data, kind):
    r = _recipe(
        tmp_path,
        tiny_models,
        tiny_data,
        task="classification",
        kind=kind,
        arch="bert",
        train={"epochs": 1},
    )
    out = train_run(r, UI())
    weights = load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), (
        "LoRA B never moved from its zero init"
    )
    assert any("classifier" in k for k in weights)
    init = load_file(
        str(r.run_dir / "init" / "head.safetensors")
    )  # the fresh head the run started from
    assert init
    for name, start in init.items():
        saved = [v for k, v in weights.items() if k.endswith(name)]
        assert saved and not torch.equal(saved[0].float(), start), (
            f"{name} never moved from its init"
        )
    assert out["merge"]["passed"]
    # LoRA on query/value of a 32-wide, 2-layer BERT at r=4: 2 layers x 2 targets x 4 x (32 + 32)
    assert out["params"]["lora"] == 2 * 2 * 4 * (32 + 32)


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_chat_tuning_lowers_completion_loss(tmp_path, tiny_models, tiny_data, kind):
    r = _recipe(
        tmp_path,
        tiny_models,
        tiny_data,
        task="causal_lm",
        kind=kind,
        arch="llama",
        train={"epochs": 3, "optimizer": {"name": "adamw", "lr": 1.0e-2}},
    )
    out = train_run(r, UI())
    rows = _metrics(r.run_dir)
    losses = [x["loss"] for x in rows if "loss" in x]
    # 4-bit weights of a 32-wide toy model lose much of its pre-training: QLoRA learns more slowly here
    assert losses[-1] < (0.85 if kind == "qlora" else 0.7) * losses[0], losses
    assert out["eval"]["metrics"]["completion_loss"] < (
        0.95 if kind == "qlora" else 0.8
    ) * _base_test_loss(r), out["eval"]


def _base_test_loss(r) -> float:
    """The untouched base model's completion loss on the run's sealed test split."""
    from ftcli.data.examples import load_prepared
    from ftcli.data.tokenize import tokenize
    from ftcli.evaluation.score import evaluate
    from ftcli.models import load_base_model, load_tokenizer

    tok, _, model_dir = load_tokenizer(r.model)
    feats = tokenize(load_prepared(r.run_dir / "data").splits["test"], r, tok, None).features
    base = load_base_model(model_dir, r.task, None, tok)
    return evaluate("causal_lm", base, tok, feats, None, 32, "cpu").metrics["completion_loss"]


def test_gpt2_conv1d_lora(tmp_path, tiny_models, tiny_data):
    r = _recipe(tmp_path, tiny_models, tiny_data, task="causal_lm", kind="lora", arch="gpt2")
    out = train_run(r, UI())
    assert out["status"] == "completed" and out["merge"]["passed"]
    assert out["params"]["adapted_modules"] == 2  # one c_attn per layer


def test_qlora_keeps_learning_after_an_evaluation_pass(tiny_models, tiny_data, tmp_path):
    """An eval-mode forward must not freeze QLoRA's gradients on AVX512-BF16 CPUs
    (docs/traps.md#cpu-qlora-repacking)."""
    # 64 wide: bitsandbytes' CPU repacking (the trap) needs rows of at least one 64-weight block
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftcli.adapt import adapt
    from ftcli.data.examples import prepare
    from ftcli.data.tokenize import collate, tokenize
    from ftcli.models import load_tokenizer

    wide = tmp_path / "llama64"
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
        )
    ).save_pretrained(wide)
    tok.save_pretrained(wide)
    mapping = tiny_recipe(
        tmp_path, tiny_models, tiny_data, task="causal_lm", kind="qlora", arch="llama"
    )
    mapping["model"]["name"] = str(wide)
    r = recipe_from_mapping(mapping)
    tok, _, model_dir = load_tokenizer(r.model)
    feats = tokenize(prepare(r).splits["train"][:8], r, tok, None).features
    batch = collate(feats, tok.pad_token_id)

    def train_steps(model, n=3):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_B" in k}
        grads_none = 0
        for _ in range(n):
            model.train()
            model(**batch).loss.backward()
            grads_none += sum(p.grad is None for p in model.parameters() if p.requires_grad)
            opt.step()
            opt.zero_grad()
        moved = sum(
            not torch.equal(before[k], v) for k, v in model.named_parameters() if "lora_B" in k
        )
        return moved, grads_none

    def eval_pass(model):
        model.eval()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    adapted = adapt(r, tok, model_dir, None, "cpu")
    assert train_steps(adapted.model)[0] > 0
    eval_pass(adapted.model)
    moved, grads_none = train_steps(adapted.model)
    assert grads_none == 0 and moved == 4, "QLoRA stopped learning after an evaluation pass"

    # Control: with bitsandbytes' repacking switched back on, this CPU shows the trap (if it can).
    import bitsandbytes as bnb

    layers = [m for m in adapted.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    cpu_has_bf16 = (
        "avx512_bf16" in Path("/proc/cpuinfo").read_text()
        if Path("/proc/cpuinfo").exists()
        else False
    )
    if cpu_has_bf16:
        fresh = adapt(r, tok, model_dir, None, "cpu")
        for m in fresh.model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
        eval_pass(fresh.model)
        _, grads_none_bug = train_steps(fresh.model, n=1)
        assert grads_none_bug > 0, (
            "expected the trap to reproduce without the fix on an AVX512-BF16 CPU"
        )
    assert layers


class _InterruptAt:
    """A progress sink that presses Ctrl-C at a given step."""

    def __init__(self, step: int):
        self.step = step

    def start(self, total, done=0): ...
    def note(self, message): ...
    def stop(self): ...

    def update(self, step, **_):
        if step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(
    tmp_path, tiny_models, tiny_data, monkeypatch
):
    mapping = tiny_recipe(
        tmp_path, tiny_models, tiny_data, task="causal_lm", kind="lora", arch="llama"
    )
    mapping["train"].update(
        epochs=2,
        batch_size=8,
        gradient_accumulation=2,
        checkpoint_every=100,
        scheduler={"name": "linear", "warmup_ratio": 0.1},
    )
    mapping["method"]["dropout"] = 0.2  # dropout draws random numbers: resume must restore the RNG
    mapping["merge"] = {"enabled": False}
    straight = recipe_from_mapping({**mapping, "output_dir": str(tmp_path / "a")})
    broken = recipe_from_mapping({**mapping, "output_dir": str(tmp_path / "b")})
    train_run(straight, UI())

    total = max(x["step"] for x in _metrics(straight.run_dir))
    cut = total // 2 + 1  # mid-epoch, not on a checkpoint boundary
    monkeypatch.setattr(UI, "progress", lambda self: _InterruptAt(cut))
    with pytest.raises(Interrupted) as info:
        train_run(broken, UI())
    assert info.value.step == cut and info.value.checkpoint.name == f"step-{cut:07d}"
    assert json.loads((broken.run_dir / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    with pytest.raises(FtcliError, match="already holds a run"):
        train_run(broken, UI())
    out = train_run(broken, UI(), resume=True)
    assert out["status"] == "completed" and out["train"]["resumed_from"] == cut

    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # bit for bit (CPU, the same thread count in both runs)
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the resumed log matches the uninterrupted one step for step, every digit
    la = [(x["step"], x["loss"]) for x in _metrics(straight.run_dir) if "loss" in x]
    lb = [(x["step"], x["loss"]) for x in _metrics(broken.run_dir) if "loss" in x]
    assert la == lb


def test_same_seed_same_run(tmp_path, tiny_models, tiny_data):
    a = _recipe(
        tmp_path / "a",
        tiny_models,
        tiny_data,
        task="classification",
        kind="lora",
        arch="llama-random",
        merge={"enabled": False},
    )
    b = recipe_from_mapping(
        {
            **tiny_recipe(
                tmp_path / "b",
                tiny_models,
                tiny_data,
                task="classification",
                kind="lora",
                arch="llama-random",
            ),
            "merge": {"enabled": False},
        }
    )
    ra, rb = train_run(a, UI()), train_run(b, UI())
    assert ra["eval"]["metrics"] == rb["eval"]["metrics"]
    assert [x.get("loss") for x in _metrics(a.run_dir)] == [
        x.get("loss") for x in _metrics(b.run_dir)
    ]


def test_two_processes_on_cpu(tmp_path, tiny_models, tiny_data):
    """torchrun starts two gloo processes (accelerate launch --cpu would start one:
    docs/traps.md#two-cpu-processes-need-torchrun), and they train what one process trains on the
    same global batch: 2 x 16 examples a step there, 32 here, the same final adapter weights."""
    import yaml

    mapping = tiny_recipe(
        tmp_path, tiny_models, tiny_data, task="classification", kind="lora", arch="llama"
    )
    # 64 training examples in 2 steps an epoch, batches cut in order (no length grouping), so the
    # two ranks' batches 2k and 2k+1 are exactly the single process's batch k of 32
    mapping["data"]["max_train_examples"] = 64
    mapping["train"].update(group_by_length=False, epochs=2)
    mapping["merge"] = {"enabled": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(mapping))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "ftcli",
            "train",
            str(path),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["num_processes"] == 2 and out["status"] == "completed"
    run_dir = Path(mapping["output_dir"]) / mapping["name"]
    one = {**mapping, "output_dir": str(tmp_path / "one" / "runs")}
    one["train"] = {**mapping["train"], "batch_size": 2 * mapping["train"]["batch_size"]}
    single = recipe_from_mapping(one)
    train_run(single, UI())
    steps_two = max(x["step"] for x in _metrics(run_dir))
    steps_one = max(x["step"] for x in _metrics(single.run_dir))
    assert steps_two == steps_one == 2 * 2, (steps_one, steps_two)
    two_w = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    one_w = load_file(str(single.run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in one_w.items() if "lora_B" in k}
    assert two_w.keys() == one_w.keys() and lora_b, sorted(two_w)
    # the weights moved (LoRA B starts at zero), and both runs moved them alike
    assert max(v.abs().max().item() for v in lora_b.values()) > 1e-4
    diff = max((two_w[k] - one_w[k]).abs().max().item() for k in one_w)
    assert diff < 1e-5, diff


@pytest.mark.parametrize(
    "option", ["bf16", "checkpointing-lora", "checkpointing-full", "qlora-8bit", "plateau"]
)
def test_training_options(tmp_path, tiny_models, tiny_data, option, monkeypatch):
    mapping = tiny_recipe(
        tmp_path,
        tiny_models,
        tiny_data,
        task="causal_lm",
        kind={"checkpointing-full": "full", "qlora-8bit": "qlora"}.get(option, "lora"),
        arch="llama",
    )
    mapping["train"].update(epochs=2, eval_every=3)
    if option == "bf16":
        mapping["train"]["mixed_precision"] = "bf16"
    elif option.startswith("checkpointing"):
        mapping["train"]["gradient_checkpointing"] = True
    elif option == "qlora-8bit":
        mapping["method"]["quantization"] = {"bits": 8}
    elif option == "plateau":
        mapping["train"]["scheduler"] = {"name": "plateau", "factor": 0.1, "patience": 0}
        # so small a step that validation loss cannot improve: the plateau must cut the rate
        mapping["train"]["optimizer"] = {"name": "sgd", "lr": 1.0e-7}
    r = recipe_from_mapping(mapping)
    import ftcli.adapt
    import ftcli.pipeline

    adapted_models = []
    real_adapt = ftcli.adapt.adapt

    def keep_model(*args, **kwargs):
        adapted = real_adapt(*args, **kwargs)
        adapted_models.append(adapted.model)
        return adapted

    monkeypatch.setattr(ftcli.pipeline, "adapt", keep_model)
    out = train_run(r, UI())
    assert out["status"] == "completed"
    rows = _metrics(r.run_dir)
    losses = [x["loss"] for x in rows if "loss" in x]
    (model,) = adapted_models
    if option.startswith("checkpointing"):
        assert any(
            getattr(m, "gradient_checkpointing", False) for m in model.modules()
        )  # really turned on
    if option == "qlora-8bit":
        import bitsandbytes as bnb

        assert any(
            isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()
        )  # really loaded in 8 bits
    if option == "bf16":
        assert out["mixed_precision"] == "bf16"
    if option == "plateau":
        lrs = [x["lr"] for x in rows if "lr" in x]
        assert lrs[0] == 1e-7 and min(lrs) <= 1e-8, lrs
    else:
        assert losses[-1] < losses[0], losses
    if option == "qlora-8bit":
        assert out["merge"]["passed"]
