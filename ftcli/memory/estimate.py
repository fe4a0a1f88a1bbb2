"""The arithmetic: what one training step holds at its peak, component by component.

Every figure is bytes on one device. The peak is the larger of two moments of a steady-state step:

* the start of the backward pass (weights + optimizer states + every activation saved for backward +
  the loss's logits, their fp32 upcast and its gradient), and
* the optimizer step (weights + gradients + optimizer states + the optimizer's temporaries).

Activations (activations.py) are counted tensor by tensor from what autograd saves in each block of the family
(Llama-style decoders, BERT encoders, GPT-2), with and without gradient checkpointing, for eager
attention (the seq x seq probabilities are stored) and flash/SDPA kernels (they are not).

CPU mode models what the CPU does, which differs from CUDA mode: no CUDA context (a small
runtime constant instead); torch's optimizers take the per-tensor path (temporaries the size of the
largest tensor, not of a whole parameter group); dropout keeps a noise tensor in the input's dtype,
not a bool mask; SDPA with dropout falls back to the math kernel and keeps the seq x seq
probabilities; a checkpoint in the weights' dtype is mapped straight into the model (no load peak),
while QLoRA keeps its checkpoint file mapped and resident. The CPU figure is live tensors, which is
what a measurement with glibc's mmap threshold pinned sees (``pin_malloc_threshold``: freed tensors
leave the resident set, as they leave CUDA's). ``ftcli train`` leaves glibc's faster default heap
alone unless FTCLI_PIN_MALLOC=1, and its resident peak can then be up to ~1.5x this figure.

The few constants below are physical, not fitted: bitsandbytes' block sizes, the CUDA context, the
caching allocator's slack, and the CPU runtime's own working memory (measured once with a model
too small to matter, see bench/memory.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ftcli.memory.activations import Acts, activations
from ftcli.memory.setup import DTYPE_BYTES, SHORT, GiB, Setup, human

NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax scale per 64 weights
DQ_BLOCK = 256  # double quantization: the 8-bit absmax scales are themselves scaled per 256
BNB_OPT_BLOCK = 256  # bitsandbytes 8-bit optimizers: one fp32 absmax per 256 state values
BNB_MIN_8BIT = 4096  # ... and tensors smaller than this keep 32-bit states
ALLOCATOR_SLACK = (
    0.05  # caching allocator: reserved exceeds allocated by block rounding and cached free blocks
)
CPU_RUNTIME = (
    16 * 1024**2
)  # CPU: oneDNN/OpenMP scratch, allocator arenas, autograd bookkeeping: 15.5-16.4 MiB measured by bench/memory.py --calibrate
CARDS_GB = (16, 24, 40, 48, 80)


# --------------------------------------------------------------------------- weights


def quantized_bytes(numel: int, out_features: int, s: Setup) -> tuple[int, int]:
    """(packed weights, scales) for one bitsandbytes-quantized linear weight."""
    if s.quant_bits == 8:  # LLM.int8: int8 weights, one fp32 scale per output row
        return numel, 4 * out_features
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / NF4_BLOCK)
    if s.double_quant:
        # 8-bit absmax per block, an fp32 absmax per 256 of those, a 256-entry fp32 code and an fp32 offset
        scales = blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 * 256 + 4
    else:
        scales = 4 * blocks
    return packed, scales + 4 * 16  # the 16-value NF4/FP4 code table


def weight_storage(inv, s: Setup) -> dict:
    """Bytes of every parameter by precision, as training holds them."""
    by: dict[str, int] = {}
    scales = quantized_params = 0
    qlabel = "int8" if s.quant_bits == 8 else s.quant_type
    for p in inv.params:
        if p.lora:
            label = SHORT[s.adapter_dtype]
            n = p.numel * DTYPE_BYTES[s.adapter_dtype]
        elif (
            s.method == "qlora"
            and p.quantizable
            and (not s.quantize_targets_only or ".base_layer." in p.name)
        ):
            packed, sc = quantized_bytes(p.numel, p.shape[0], s)
            by[qlabel] = by.get(qlabel, 0) + packed
            scales += sc
            quantized_params += p.numel
            continue
        else:
            dt = s.unquantized_dtype if s.method == "qlora" else s.dtype
            label, n = SHORT[dt], p.numel * DTYPE_BYTES[dt]
        by[label] = by.get(label, 0) + n
    if scales:
        by[f"{qlabel} scales"] = scales
    return {"by_precision": by, "quantized_params": quantized_params, "total": sum(by.values())}


def param_bytes(p, s: Setup) -> int:
    """Bytes per element of a trainable parameter (and so of its gradient)."""
    if p.lora:
        return DTYPE_BYTES[s.adapter_dtype]
    return DTYPE_BYTES[s.unquantized_dtype if s.method == "qlora" else s.dtype]


def optimizer_state_bytes(p, s: Setup) -> int:
    """Optimizer state for one trainable parameter tensor."""
    b = param_bytes(p, s)
    n = p.numel
    o = s.optimizer
    if o in ("adamw", "adam"):
        return 2 * n * b  # exp_avg and exp_avg_sq, like the parameter
    if o == "sgd":
        return n * b if s.momentum > 0 else 0
    if o == "rmsprop":
        return n * b * (2 if s.momentum > 0 else 1)  # square_avg (+ momentum_buffer)
    if o in ("adamw8bit", "paged_adamw8bit"):
        if n < BNB_MIN_8BIT or (s.fp32_embedding_states and p.kind == "embedding"):
            return 8 * n
        return 2 * n + 2 * 4 * math.ceil(n / BNB_OPT_BLOCK)
    if o == "paged_adamw":
        return 8 * n  # two fp32 states whatever the parameter dtype
    raise AssertionError(o)


def optimizer_temporaries(trainable, s: Setup) -> int:
    """Transient memory of ``optimizer.step()``. torch's foreach path (CUDA) builds a list as large as a
    whole parameter group (sqrt of exp_avg_sq); the per-tensor path (CPU) two tensors as large as the
    largest parameter; bitsandbytes' fused kernels none."""
    o = s.optimizer
    if o not in ("adamw", "adam", "rmsprop") or not trainable:
        return 0
    if s.device == "cuda":
        # ftcli (like HF Trainer) makes two groups: matrices with weight decay, vectors without
        matrices = sum(p.numel * param_bytes(p, s) for p in trainable if len(p.shape) >= 2)
        vectors = sum(p.numel * param_bytes(p, s) for p in trainable if len(p.shape) < 2)
        return max(matrices, vectors)
    largest = max(p.numel * param_bytes(p, s) for p in trainable)
    return (2 if o in ("adamw", "adam") else 1) * largest


# --------------------------------------------------------------------------- the whole estimate


@dataclass
class Estimate:
    """The breakdown, the peak and its phase, per device, for one Setup."""

    setup: Setup
    params_total: int
    params_trainable: int
    lora_params: int
    weights: dict
    gradients: int
    optimizer_states: int
    optimizer_paged: int
    optimizer_step_temp: int
    acts: Acts
    peak_allocated: int
    peak_phase: str
    overhead: int
    load_peak: int
    total: int
    phases: dict
    notes: list[str]
    mapped_checkpoint: int = 0
    shard: int = 1  # FSDP: weights, gradients and optimizer states split over this many devices
    gather: int = 0  # FSDP: the blocks gathered unsharded at a time

    def components(self) -> list[tuple[str, int, str]]:
        """(name, bytes, how) rows for the breakdown table: per device, like the total (under
        FSDP the sharded parts are shown as one device holds them)."""
        s = self.setup
        w = self.weights["by_precision"]
        k = self.shard
        split = f"1/{k} of it on each device (FSDP)" if k > 1 else ""
        rows = []
        for label, n in w.items():
            rows.append((f"weights {label}", n // k, split))
        rows.append(
            (
                "gradients",
                self.gradients // k,
                f"{self.params_trainable:,} trainable parameters" + (f", {split}" if k > 1 else ""),
            )
        )
        rows.append((f"optimizer states ({s.optimizer})", self.optimizer_states // k, split))
        if self.gather:
            rows.append(("FSDP gathered blocks", self.gather, "two blocks unsharded at a time"))
        if self.optimizer_paged:
            rows.append(
                (
                    "optimizer states, paged",
                    self.optimizer_paged,
                    "unified memory: spills to CPU RAM instead of failing",
                )
            )
        rows.append(
            (
                "optimizer step temporaries",
                self.optimizer_step_temp // k,
                "foreach (CUDA) / per tensor (CPU)",
            )
        )
        a = self.acts
        how = f"{s.batch_size}x{s.seq_len} tokens, {a.layers} blocks, " + (
            "checkpointed: block inputs + one block recomputed"
            if a.checkpoints
            else "every block saved"
        )
        rows.append(
            ("activations", a.stored + a.outside + (a.per_layer if a.checkpoints else 0), how)
        )
        rows.append(
            (
                "backward working set",
                a.working,
                "one block's gradients in flight"
                + (", dequantized 4-bit weight" if s.method == "qlora" else ""),
            )
        )
        if a.weight_copies or a.weight_copies_forward:
            rows.append(
                (
                    "autocast weight copies",
                    max(a.weight_copies, a.weight_copies_forward),
                    "bf16 casts of fp32 linear weights",
                )
            )
        rows.append(
            (
                "logits and loss",
                a.loss_peak,
                "classifier logits"
                if s.task != "causal_lm"
                else "ftcli's loss: LM head on supervised positions, 1,024 at a time"
                if s.loss_path == "ftcli"
                else "full logits, fp32 log-softmax and its gradient (the transformers loss)",
            )
        )
        if self.mapped_checkpoint:
            rows.append(
                (
                    "mapped checkpoint pages",
                    self.mapped_checkpoint,
                    "CPU QLoRA: the file read for quantization",
                )
            )
        rows.append(
            (
                "framework overhead",
                self.overhead,
                "CUDA context + allocator slack"
                if s.device == "cuda"
                else "CPU runtime working memory",
            )
        )
        return rows

    def as_dict(self) -> dict:
        s = self.setup
        return {
            "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
            "params": {
                "total": self.params_total,
                "trainable": self.params_trainable,
                "lora": self.lora_params,
            },
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "optimizer_states_paged": self.optimizer_paged,
            "optimizer_step_temporaries": self.optimizer_step_temp,
            "activations": {
                "per_layer": self.acts.per_layer,
                "layers": self.acts.layers,
                "checkpoints": self.acts.checkpoints,
                "outside_blocks": self.acts.outside,
                "working": self.acts.working,
                "loss_peak": self.acts.loss_peak,
                "autocast_weight_copies": max(
                    self.acts.weight_copies, self.acts.weight_copies_forward
                ),
                "per_token_per_layer": self.acts.detail["per_token_per_layer"],
                "parts_per_token_per_layer": self.acts.detail["parts_per_token_per_layer"],
            },
            "phases": self.phases,
            "peak_allocated": self.peak_allocated,
            "peak_phase": self.peak_phase,
            "overhead": self.overhead,
            "load_peak": self.load_peak,
            "mapped_checkpoint": self.mapped_checkpoint,
            "total": self.total,
            "components": [{"name": n, "bytes": b, "how": h} for n, b, h in self.components()],
            "notes": self.notes,
        }


def estimate(inv, s: Setup) -> Estimate:
    """The peak memory of one device training ``inv`` (a meta-device Inventory) under ``s``."""
    s.check()
    trainable = [p for p in inv.params if p.trainable]
    weights = weight_storage(inv, s)
    W = weights["total"]
    G = sum(p.numel * param_bytes(p, s) for p in trainable)
    states = sum(optimizer_state_bytes(p, s) for p in trainable)
    paged = states if s.optimizer.startswith("paged") and s.device == "cuda" else 0
    OPT = states - paged
    T_opt = optimizer_temporaries(trainable, s)
    acts = activations(inv, s)
    notes = []

    mapped = 0
    n = s.num_devices
    shard = n if s.strategy == "fsdp" and n > 1 else 1
    if s.reference_copy:  # a frozen copy of the base weights: no gradients, no states
        ref = sum(p.numel for p in inv.params if not p.lora) * DTYPE_BYTES[s.dtype]
        weights = {
            **weights,
            "by_precision": {**weights["by_precision"], "reference model": ref},
            "total": W + ref,
        }
        W = weights["total"]
        notes.append(f"the reference model is a second, frozen copy of the weights ({human(ref)})")
    Ws, Gs, Os = W // shard, G // shard, OPT // shard
    gather = 0
    ddp_buckets = 0
    if shard > 1:
        # FSDP all-gathers one block at a time, and prefetches the next: two blocks unsharded
        unit = max(1, inv.layer_linear_params())
        gather = 2 * unit * (DTYPE_BYTES[s.dtype] if s.method != "qlora" else 1)
        notes.append(
            f"FSDP over {n} devices: weights, gradients and optimizer states sharded; two blocks gathered at a time"
        )
    elif n > 1:
        ddp_buckets = G  # DDP copies gradients into its all-reduce buckets
        notes.append(
            f"DDP over {n} devices: every device holds the whole model; gradient buckets add one gradient copy"
        )
    # gradients live through forward/backward only when accumulated over micro-batches
    G_fb = Gs if s.gradient_accumulation > 1 or not s.zero_grad_to_none else 0
    phases = {
        "forward": Ws + Os + G_fb + gather + acts.forward_peak,
        "backward": Ws + Os + G_fb + gather + acts.backward_peak + ddp_buckets,
        "optimizer step": Ws + Gs + Os + T_opt // shard + ddp_buckets,
    }
    phase = max(phases, key=phases.get)
    peak = phases[phase]
    if s.device == "cuda":
        overhead = s.cuda_context + int(ALLOCATOR_SLACK * peak)
        load_peak = 0
    else:
        overhead = CPU_RUNTIME
        # CPU: from_pretrained maps the checkpoint file; its pages count as resident while weights are built
        ckpt = s.checkpoint_bytes if s.checkpoint_bytes is not None else 0
        unquantized = sum(
            b for k, b in weights["by_precision"].items() if k in ("fp32", "bf16", "fp16")
        )
        mapped = 0
        if s.method == "qlora":
            # bitsandbytes reads every weight through the mapped checkpoint to quantize it, and the
            # unquantized weights are copied out of it; the file stays mapped and its pages resident
            mapped = ckpt
            phases = {k: v + mapped for k, v in phases.items()}
            load_peak = ckpt + W
            if mapped:
                notes.append(
                    f"CPU QLoRA: the checkpoint file read for quantization stays mapped and resident ({human(mapped)})"
                )
        else:
            # same dtype: from_pretrained maps the file and the weights are its pages (no copy); another dtype converts
            load_peak = 0 if abs(ckpt - unquantized) <= 0.02 * max(1, unquantized) else ckpt + W
        phases["load"] = load_peak
        phase = max(phases, key=phases.get)
        peak = phases[phase]
    if paged:
        notes.append(
            f"paged optimizer states ({human(paged)}) live in unified memory and are not in the total"
        )
    if s.method == "qlora" and s.device == "cpu":
        notes.append(
            "CPU QLoRA: bitsandbytes dequantizes each 4-bit weight for every matmul (see the working set)"
        )
    return Estimate(
        setup=s,
        params_total=inv.total,
        params_trainable=sum(p.numel for p in trainable),
        lora_params=sum(p.numel for p in trainable if p.lora),
        weights=weights,
        gradients=G,
        optimizer_states=OPT,
        optimizer_paged=paged,
        optimizer_step_temp=T_opt,
        acts=acts,
        peak_allocated=peak,
        peak_phase=phase,
        overhead=overhead,
        load_peak=load_peak,
        mapped_checkpoint=mapped,
        total=peak + overhead,
        phases=phases,
        notes=notes,
        shard=shard,
        gather=gather,
    )


def per_device_table(inv, s: Setup, max_devices: int = 8) -> list[dict]:
    """Total per device for 1, 2, 4, 8 devices under DDP and FSDP."""
    rows = []
    k = 1
    while k <= max_devices:
        ddp = estimate(inv, replace(s, num_devices=k, strategy="ddp")).total
        fsdp = estimate(inv, replace(s, num_devices=k, strategy="fsdp")).total
        rows.append({"devices": k, "ddp": ddp, "fsdp": fsdp})
        k *= 2
    return rows


def card_capacity(gb: int) -> int:
    """A card sold as N GB holds N GiB (an A100-80GB reports 79.3 GiB to torch: keep 1% back)."""
    return int(gb * GiB * 0.99)


def fits_cards(total: int) -> list[dict]:
    return [
        {"card_gb": g, "capacity": card_capacity(g), "fits": total <= card_capacity(g)}
        for g in CARDS_GB
    ]


def max_micro_batch(inv, s: Setup, budget: int, limit: int = 4096) -> int:
    """The largest micro-batch whose total fits ``budget`` (0: not even one example)."""

    def fits(b: int) -> bool:
        return estimate(inv, replace(s, batch_size=b)).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def precision_table(inv) -> list[dict]:
    """Weights alone at each precision: fp32, fp16/bf16, int8, NF4 (with and without double quantization)."""
    total = inv.base_total
    quantizable = sum(p.numel for p in inv.params if p.quantizable)
    rest = total - quantizable
    rows = [
        {"precision": "fp32", "bytes": 4 * total, "bytes_per_param": 4.0},
        {"precision": "fp16/bf16", "bytes": 2 * total, "bytes_per_param": 2.0},
    ]
    for label, setup, rest_bytes in (
        ("int8 (LLM.int8, rest fp16)", Setup(method="qlora", quant_bits=8), 2),
        ("nf4 (rest fp16)", Setup(method="qlora", double_quant=False), 2),
        ("nf4 + double quant (rest fp16)", Setup(method="qlora", double_quant=True), 2),
    ):
        q = sum(
            sum(quantized_bytes(p.numel, p.shape[0], setup)) for p in inv.params if p.quantizable
        )
        b = q + rest_bytes * rest
        rows.append(
            {
                "precision": label,
                "bytes": b,
                "bytes_per_param": round(b / total, 4),
                "quantized_bytes_per_param": round(q / max(1, quantizable), 4),
            }
        )
    return rows
