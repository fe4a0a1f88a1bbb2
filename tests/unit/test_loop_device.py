"""The loop's device path, checked on the CPU: DeepSpeed's config and accumulation wiring, the
optimizer built on the model's device (fused AdamW on CUDA), the packing path and its mask dtype,
and host syncs cut to one per logging window."""

from __future__ import annotations

import contextlib
import inspect
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftcli.data.tokenize import IGNORE_INDEX, collate, pack
from ftcli.distributed import configure_deepspeed, deepspeed_settings
from ftcli.forward import loss_sums
from ftcli.recipe import recipe_from_mapping
from ftcli.train.batching import FLEX, MASK, VARLEN, compute_dtype, packing_path
from ftcli.train.optim import fused_adamw


def _recipe(**train):
    return recipe_from_mapping(
        {
            "name": "t",
            "task": "classification",
            "model": {"name": "m"},
            "data": {"path": "d.csv", "label_column": "label"},
            "method": {"kind": "full"},
            "train": {"optimizer": {"name": "sgd", "lr": 0.1}, **train},
        }
    )


def _deepspeed_accelerator(plugin, world: int = 2):
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=plugin),
        num_processes=world,
        gradient_accumulation_steps=1,
    )


# --------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_gets_the_recipes_micro_batch_accumulation_and_clipping():
    """accelerate refuses prepare(model, optimizer) while the micro-batch size is "auto" (no
    dataloader is prepared with them), and would fill gradient_clipping with its own 1.0."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=3, gradient_clipping=1.0)  # configs/accelerate's
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what prepare refuses
    acc = _deepspeed_accelerator(plugin)
    t = _recipe(batch_size=4, gradient_accumulation=3, max_grad_norm=0.3).train
    assert configure_deepspeed(acc, t) == deepspeed_settings(t, 2)
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    # accelerate's own fill-in at prepare (_prepare_deepspeed) leaves the recipe's values alone
    plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0)
    cfg = plugin.deepspeed_config
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3 and acc.gradient_accumulation_steps == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 0.3
    no_clip = _recipe(max_grad_norm=None).train
    assert deepspeed_settings(no_clip, 1)["gradient_clipping"] == 0.0  # 0: DeepSpeed clips nothing


def test_configure_deepspeed_leaves_other_modes_alone():
    acc = SimpleNamespace(distributed_type="NO", num_processes=1)
    assert configure_deepspeed(acc, _recipe().train) is None


class _Out(SimpleNamespace):
    pass


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        return _Out(logits=self.head(self.emb(input_ids).mean(1)))


class _FakeDeepSpeedAccelerator:
    """What train_step touches of accelerate under DeepSpeed, recording each backward."""

    def __init__(self):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.num_processes = 1
        self.mixed_precision = "no"
        self.sync_gradients = True
        self.device = torch.device("cpu")
        self.backwards: list[tuple[bool, float]] = []
        self.clipped = 0

    def reduce(self, t, how):
        return t

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        self.backwards.append((self.sync_gradients, loss.item()))
        loss.backward()

    def clip_grad_norm_(self, params, norm):
        self.clipped += 1


def test_under_deepspeed_the_engine_steps_once_per_group_and_the_loss_is_not_scaled_twice():
    """accelerate's DeepSpeed backward steps the engine whenever sync_gradients is set, and the
    engine divides the loss by the configured accumulation: ftcli marks only the group's last
    micro-batch, multiplies the loss back, leaves clipping to the engine, and steps the
    learning-rate schedule once per group."""
    from ftcli.train.loop import LoopState, Tally, train_step

    torch.manual_seed(0)
    r = _recipe(batch_size=2, gradient_accumulation=3, max_grad_norm=1.0)
    model = _Classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = _FakeDeepSpeedAccelerator()
    group = [
        {
            "input_ids": torch.randint(0, 20, (2, 5)),
            "attention_mask": torch.ones(2, 5, dtype=int),
            "labels": torch.randint(0, 2, (2,)),
        }
        for _ in range(3)
    ]
    with torch.no_grad():
        mean = sum(loss_sums(model, b, "classification")[0] for b in group).item() / 6
    state, tally = LoopState(), Tally(acc.device, None, None)
    train_step(
        group,
        accelerator=acc,
        model=model,
        optimizer=opt,
        scheduler=sched,
        state=state,
        tally=tally,
        recipe=r,
        rows=[[0, 1], [2, 3], [4, 5]],
    )
    assert [sync for sync, _ in acc.backwards] == [False, False, True]
    # the engine divides each by 3: what it accumulates is the step's mean loss
    assert sum(v for _, v in acc.backwards) / 3 == pytest.approx(mean, rel=1e-5)
    assert acc.sync_gradients and acc.clipped == 0 and tally.grad_norm is None
    assert sched.last_epoch == 1 and state.global_step == 1
    assert tally.loss.item() == pytest.approx(mean, rel=1e-5)  # logged: the step's mean loss


# --------------------------------------------------------------------------- the optimizer


def test_fused_adamw_is_chosen_on_cuda_only():
    assert fused_adamw(torch.device("cuda", 0)) is True
    assert fused_adamw("cuda") is True
    assert fused_adamw("cpu") is None and fused_adamw(torch.device("mps")) is None


def test_the_optimizer_is_built_after_the_model_is_placed(
    monkeypatch, tmp_path, tiny_models, tiny_data
):
    """The model moves to the accelerator's device first, then the optimizer is built for that
    device (before: built while the model was still on the CPU, so never fused on CUDA)."""
    import ftcli.train.loop as loop

    seen: list = []
    real_place, real_build = loop.place, loop.build_optimizer

    def place(model, accelerator):
        seen.append(("place", str(accelerator.device)))
        return real_place(model, accelerator)

    def build(recipe, model, device=None):
        seen.append(("optimizer", str(device), {str(p.device) for p in model.parameters()}))
        return real_build(recipe, model, device=device)

    monkeypatch.setattr(loop, "place", place)
    monkeypatch.setattr(loop, "build_optimizer", build)
    _train(tmp_path, tiny_models, tiny_data, max_steps=1)
    assert seen == [("place", "cpu"), ("optimizer", "cpu", {"cpu"})]


# --------------------------------------------------------------------------- packing


def test_the_packing_path_is_the_fastest_isolating_one_available():
    assert packing_path("cuda", "flash_attention_2", True, True) == VARLEN
    assert packing_path("cuda", "flash_attention_2", False, True) == FLEX
    assert packing_path("cuda", "sdpa", True, True) == FLEX
    assert packing_path("cuda", "sdpa", False, False) == MASK
    assert packing_path("cpu", "sdpa", False, True) == MASK  # flex: CUDA only
    assert packing_path("cpu", "eager", False, False) == MASK


def _features(vocab: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    feats = []
    for _ in range(n):
        k = rng.randrange(5, 30)
        ids = [rng.randrange(3, vocab) for _ in range(k)]
        cut = rng.randrange(1, k - 1)
        feats.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * k,
                "labels": [IGNORE_INDEX] * cut + ids[cut:],
            }
        )
    return feats


def _causal(tiny_models, dtype, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], attn_implementation=attn, dtype=dtype
    ).eval()


def test_the_mask_takes_the_compute_dtype(tiny_models):
    model = _causal(tiny_models, torch.bfloat16)
    assert compute_dtype(model, "no") == torch.bfloat16
    assert compute_dtype(_causal(tiny_models, torch.float32), "bf16") == torch.bfloat16
    assert compute_dtype(_causal(tiny_models, torch.float32), "no") == torch.float32
    m = pack(_features(50, 3, 0), pad_id=0, mask_dtype=torch.bfloat16)["attention_mask"]
    assert m.dtype == torch.bfloat16 and m.min() == torch.finfo(torch.bfloat16).min
    assert pack(_features(50, 3, 0), pad_id=0)["attention_mask"].dtype == torch.float32
    assert "attention_mask" not in pack(_features(50, 3, 0), pad_id=0, mask=False)


def test_bf16_weights_train_on_a_packed_batch_like_the_unpacked_one(tiny_models):
    """CUDA's SDPA kernels refuse a float32 mask with bf16 queries (the CPU's accepts it, so the
    refusal itself cannot be shown here); with the mask in bf16 the packed loss matches."""
    model = _causal(tiny_models, torch.bfloat16)
    feats = _features(model.config.vocab_size, 7, 1)
    with torch.no_grad():
        s_u, n_u = loss_sums(model, collate(feats, pad_id=0), "causal_lm")
        packed = pack(feats, pad_id=0, row_tokens=40, mask_dtype=compute_dtype(model, "no"))
        s_p, n_p = loss_sums(model, packed, "causal_lm")
    assert n_p == n_u
    assert (s_p / n_p).item() == pytest.approx((s_u / n_u).item(), rel=2e-2)  # bf16: ~3 digits
    model.train()
    s, n = loss_sums(model, packed, "causal_lm")
    (s / n).backward()  # and backward runs
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_flex_attention_isolates_packed_examples_from_position_ids(tiny_models, monkeypatch):
    """The flex path's semantics (transformers builds the block mask from the position ids, with
    no cache), checked on the CPU in flex's eager reference form. The compiled CPU kernel is not
    what CUDA runs: it took minutes to compile here and disagreed (0.2 in the logits on a 2-layer
    Llama), so the kernel itself is checked by bench's GPU smoke, not here."""
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():
        pytest.skip("this torch has no flex_attention")
    import transformers.masking_utils as mu
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations.flex_attention import WrappedFlexAttention

    real = mu.create_block_mask
    monkeypatch.setattr(WrappedFlexAttention, "__call__", lambda self: flex_attention)  # eager
    monkeypatch.setattr(
        mu, "create_block_mask", lambda *a, **k: real(*a, **{**k, "_compile": False})
    )
    model = _causal(tiny_models, torch.float32, attn="flex_attention")
    model.config.use_cache = False
    feats = _features(model.config.vocab_size, 5, 2)
    packed = pack(feats, pad_id=0, row_tokens=10_000, mask=False)
    with torch.no_grad():
        row = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        at = 0
        for f in sorted(feats, key=lambda f: -len(f["input_ids"])):  # pack_rows' order
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            k = len(f["input_ids"])
            assert torch.allclose(row[at : at + k], alone, atol=1e-5)
            at += k


# --------------------------------------------------------------------------- host syncs

SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def _train(tmp_path, tiny_models, tiny_data, **train):
    from ftcli.pipeline import train_run
    from ftcli.ui import UI
    from tests.conftest import tiny_recipe

    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm", arch="llama")
    m["data"]["split"] = {"validation": 0.0, "test": 0.2, "seed": 0}
    m["train"].update(batch_size=4, **train)
    m["merge"] = {"enabled": False}
    r = recipe_from_mapping(m)
    train_run(r, UI())
    return r.run_dir


def test_host_syncs_are_one_per_logging_window(monkeypatch, tmp_path, tiny_models, tiny_data):
    """No ftcli line reads a device value inside a training step (before: the loss check, the
    step loss, the token counts and the gradient norm, every micro-batch or step); the tallies
    are read once per log row."""
    ftcli_dir = str(Path(__file__).resolve().parents[2] / "ftcli")
    counts = {"train_step": 0, "settle": 0}

    def where() -> str | None:
        f = inspect.currentframe().f_back.f_back  # the caller of the patched method
        if not f.f_code.co_filename.startswith(ftcli_dir):
            return None  # transformers' and torch's own reads are not the loop's
        while f is not None:
            if f.f_code.co_name in counts:
                return f.f_code.co_name
            f = f.f_back
        return None

    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            at = where()
            if at:
                counts[at] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    run = _train(
        tmp_path,
        tiny_models,
        tiny_data,
        max_steps=6,
        log_every=3,
        gradient_accumulation=2,
        max_grad_norm=1.0,
        max_loss_spike=100.0,
        checkpoint_every=100,
    )
    monkeypatch.undo()
    assert counts == {"train_step": 0, "settle": 2}  # 6 steps, a row every 3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_qlora_under_zero3_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    """ZeRO-3 refuses the device_map a 4-bit base is loaded with, and partitions the 4-bit weights
    with the float ones: accelerate launch's environment tells the loader before it loads."""
    from ftcli.distributed import zero3_requested
    from ftcli.models import quantization_config
    from ftcli.recipe import QuantSpec

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not zero3_requested()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero3_requested()
    qc = quantization_config(QuantSpec(compute_dtype="bfloat16"))
    assert qc.bnb_4bit_quant_storage == torch.bfloat16
