"""Activation memory: what autograd saves for backward in each block, counted tensor by tensor.

Per family (Llama-style decoders, BERT encoders, GPT-2), per token, from the architecture's
dimensions: norms, the inputs that trainable weights and LoRA adapters need, attention's internals
(flash/SDPA keep q, k, v and the output; eager and CPU SDPA with dropout keep the seq x seq
probabilities), the MLP, dropout masks (CUDA keeps bools, the CPU a noise tensor), the loss's
logits with its fp32 upcast, and autocast's bf16 weight copies. tests/unit/test_memory_autograd.py
checks these counts against autograd's saved tensors on real models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftcli.memory.setup import DTYPE_BYTES, LOSS_CHUNK, Setup


@dataclass
class Acts:
    """Activation memory of one micro-batch, in bytes (whole batch)."""

    per_layer: int  # saved for backward by one block
    layers: int
    checkpoints: int  # gradient checkpointing: what stays saved (block inputs)
    outside: int  # saved outside the blocks: embeddings, final norm, head input
    loss_peak: int  # logits + fp32 upcast + log-softmax + its gradient, at the start of backward
    loss_forward: int  # logits + fp32 upcast + log-softmax at the end of forward
    working: int  # one block's largest transient during its backward
    weight_copies: int = 0  # autocast's bf16 copies of fp32 linear weights, kept for backward
    weight_copies_forward: int = (
        0  # ... held by autocast's cast cache during the forward (trainable weights)
    )
    detail: dict = field(default_factory=dict)

    @property
    def stored(self) -> int:
        return self.checkpoints if self.checkpoints else self.per_layer * self.layers

    @property
    def backward_peak(self) -> int:
        """At the start of backward: saved activations + the loss's buffers, or, with checkpointing,
        the checkpoints + one block recomputed + its working set."""
        if self.checkpoints:
            layer = self.per_layer + self.working + self.detail.get("layer_weight_copies", 0)
            return self.checkpoints + self.outside + max(self.loss_peak + self.weight_copies, layer)
        return self.stored + self.outside + max(self.loss_peak, self.working) + self.weight_copies

    @property
    def forward_peak(self) -> int:
        return self.stored + self.outside + self.loss_forward + self.weight_copies_forward


def _mask_bytes(s: Setup, x_bytes: int) -> int:
    """Bytes per element a dropout keeps for backward: CUDA's fused kernel a bool mask; the CPU path
    multiplies by a noise tensor of the input's dtype and keeps that."""
    return 1 if s.device == "cuda" else x_bytes


def _group_input(
    consumers: list[tuple[str, int]], x_bytes: int, full: bool, lora: dict, s: Setup
) -> int:
    """Bytes per token saved for the inputs of linears that read the same tensor x.

    ``consumers`` are (role, in_features). A trainable weight needs its input for its gradient; a
    LoRA target saves its A's input (x cast to the adapter dtype, after dropout when p > 0). Under
    autocast each consumer saves its own bf16 copy when x is fp32, one shared tensor when it is not.
    """
    total = 0
    shared = 0
    for role, in_f in consumers:
        if full:
            if s.autocast and x_bytes == 4:
                total += 2 * in_f
            else:
                shared = max(shared, x_bytes * in_f)
        t = lora.get(role)
        if t is not None:
            p = t["dropout"]
            ab = DTYPE_BYTES[s.adapter_dtype]
            if p > 0:
                total += _mask_bytes(s, ab) * in_f
            if s.autocast:
                total += 2 * in_f
            elif p > 0 or x_bytes != ab:
                total += ab * in_f
            else:
                shared = max(shared, x_bytes * in_f)
    return total + shared


def _lora_masks(consumers: list[tuple[str, int]], lora: dict, s: Setup) -> int:
    """The dropout masks among ``_group_input``'s bytes (absent in the first block, whose input needs no gradient)."""
    ab = DTYPE_BYTES[s.adapter_dtype]
    return sum(
        _mask_bytes(s, ab) * in_f
        for role, in_f in consumers
        if role in lora and lora[role]["dropout"] > 0
    )


def _attention(
    d, s: Setup, a: int, q_dim: int, kv_dim: int, p_drop: float, impl: str
) -> tuple[int, int]:
    """(saved bytes, backward working bytes) per token for attention's internals."""
    seq = s.seq_len
    n = d.heads
    ns = n * seq
    if impl == "sdpa" and s.device == "cpu" and p_drop > 0:
        # CPU SDPA with dropout runs the math kernel: q, k, v in batched form, the softmax output,
        # the dropout noise and the dropped probabilities, all in the compute dtype, which CPU
        # autocast keeps float32 for SDPA (counted with saved-tensor hooks: 72 + 87 MiB of fp32
        # attention tensors on MiniLM-L6 at 32 x 64 under bf16 autocast)
        c = 4 if s.autocast else a
        return c * 3 * q_dim + 3 * c * ns, 2 * c * ns
    if impl == "eager":
        saved = a * (q_dim + 2 * kv_dim) + a * q_dim  # q, k, v and the context
        probs = 4 * ns if d.family == "llama" else a * ns  # Llama upcasts the softmax to fp32
        if d.family == "llama" and a != 4:
            probs += a * ns
        if p_drop > 0:
            probs += _mask_bytes(s, a) * ns + a * ns
        return saved + probs, 2 * 4 * ns
    saved = (
        a * (q_dim + 2 * kv_dim) + a * q_dim + 4 * n
    )  # flash / memory-efficient: q, k, v, output, log-sum-exp
    if impl == "sdpa" and d.kv_heads != d.heads and s.device == "cuda":
        saved += (
            a * 2 * (q_dim - kv_dim)
        )  # a padding mask makes transformers repeat k and v for GQA
    return saved, 0


def activations(inv, s: Setup) -> Acts:
    """Activation bytes for one micro-batch of ``s.batch_size`` x ``s.seq_len`` tokens."""
    d = inv.dims
    full = s.method == "full"
    r = DTYPE_BYTES[s.unquantized_dtype if s.method == "qlora" else s.dtype]  # residual stream
    o = (
        2 if s.autocast else r
    )  # linear outputs (bitsandbytes casts its output back to the input dtype)
    impl = s.attn_implementation
    a = 2 if (s.autocast or impl == "flash_attention_2") else o
    h, i, V = d.hidden, d.intermediate, d.vocab
    q_dim, kv_dim = d.heads * d.head_dim, d.kv_heads * d.head_dim
    lora = {}
    for key, t in inv.lora_targets.items():
        leaf = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        lora[_role(d.family, parent, leaf)] = t
    T = s.tokens

    if d.family == "llama":
        norm = 4 * h + (
            r * h if full else 0
        )  # RMSNorm keeps its fp32 input (+ the normalized x for its weight)
        qkv = [("q", h), ("k", h), ("v", h)]
        attn_in = _group_input(qkv, r, full, lora, s)
        first_less = (
            0 if full else 4 * h + _lora_masks(qkv, lora, s)
        )  # block 0's input needs no gradient
        att, att_work = _attention(d, s, a, q_dim, kv_dim, 0.0, impl)
        o_in = _group_input([("o", q_dim)], a, full, lora, s)
        mlp_in = _group_input([("gate", h), ("up", h)], r, full, lora, s)
        mlp = 3 * o * i  # gate output (activation's input), activation output, up output
        down_in = _group_input([("down", i)], o, full, lora, s)
        per_tok = 2 * norm + attn_in + att + o_in + mlp_in + mlp + down_in
        work_tok = max(att_work, 2 * o * i)
        parts = {
            "norms": 2 * norm,
            "attention inputs": attn_in,
            "attention": att,
            "o_proj input": o_in,
            "mlp inputs": mlp_in,
            "mlp": mlp,
            "down_proj input": down_in,
        }
        outside_tok = 4 * h + (r * h if full else 0)
    elif d.family == "bert":
        ln = (4 if s.autocast else r) * h  # LayerNorm keeps its input (fp32 under autocast)
        ln_out = 4 if s.autocast else r
        drop_mask = _mask_bytes(s, o) * h if d.hidden_dropout > 0 else 0
        qkv = [("q", h), ("k", h), ("v", h)]
        attn_in = _group_input(qkv, r if not s.autocast else ln_out, full, lora, s)
        first_less = (
            0 if full else ln + drop_mask + _lora_masks(qkv, lora, s)
        )  # the embeddings' LayerNorm too
        att, att_work = _attention(d, s, a, q_dim, kv_dim, d.attn_dropout, impl)
        o_in = _group_input([("o", q_dim)], a, full, lora, s)
        up_in = _group_input([("up", h)], ln_out, full, lora, s)
        gelu = o * i
        down_in = _group_input([("down", i)], o, full, lora, s)
        per_tok = attn_in + att + o_in + 2 * drop_mask + 2 * ln + up_in + gelu + down_in
        work_tok = max(att_work, 2 * o * i)
        parts = {
            "attention inputs": attn_in,
            "attention": att,
            "output input": o_in,
            "dropout masks": 2 * drop_mask,
            "layernorms": 2 * ln,
            "intermediate input": up_in,
            "gelu": gelu,
            "output dense input": down_in,
        }
        outside_tok = ln + drop_mask
    else:  # gpt2
        ln = (4 if s.autocast else r) * h
        ln_out = 4 if s.autocast else r
        drop_mask = _mask_bytes(s, o) * h if d.hidden_dropout > 0 else 0
        attn_in = _group_input([("qkv", h)], ln_out, full, lora, s)
        first_less = 0 if full else ln + _lora_masks([("qkv", h)], lora, s)
        att, att_work = _attention(d, s, a, q_dim, kv_dim, d.attn_dropout, impl)
        o_in = _group_input([("o", q_dim)], a, full, lora, s)
        up_in = _group_input([("up", h)], ln_out, full, lora, s)
        gelu = (
            4 * o * i
        )  # gelu_new is written in Python: x, tanh(.), 0.5x and 1+tanh(.) are all saved
        down_in = _group_input([("down", i)], o, full, lora, s)
        per_tok = 2 * ln + attn_in + att + o_in + 2 * drop_mask + up_in + gelu + down_in
        work_tok = max(att_work, 2 * o * i)
        parts = {
            "layernorms": 2 * ln,
            "attention inputs": attn_in,
            "attention": att,
            "c_proj input": o_in,
            "dropout masks": 2 * drop_mask,
            "c_fc input": up_in,
            "gelu_new": gelu,
            "mlp c_proj input": down_in,
        }
        outside_tok = ln + drop_mask

    if s.task == "causal_lm" and s.loss_path == "ftcli":
        # the hidden states of supervised positions are gathered (and get a gradient); each chunk's
        # logits exist only inside its checkpoint: recomputed in backward, the fp32 log-softmax output,
        # its gradient and the input's gradient (12 bytes per vocabulary entry) for one chunk at a
        # time. The worst case: every position supervised (as --measure trains)
        gathered = T * h * o
        loss_forward = gathered
        loss_peak = 2 * gathered + min(LOSS_CHUNK, T) * 12 * V
    elif s.task == "causal_lm":
        # After forward: the logits in the head's dtype (the model output holds them) and the fp32
        # log-softmax output; the upcast dies with the loss function's frame. The caller drops the
        # output before backward (Trainer does; so does --measure), so at the backward peak only the
        # fp32 log-softmax output, its gradient and the input's gradient remain: 12 bytes per token
        # per vocabulary entry whatever the head's dtype (an fp32 QLoRA head adds nothing here).
        # Counted live on the CPU (tests/unit/test_memory_autograd.py): 12.1 at the peak; a caller
        # that keeps the output holds 14.1 (bf16 head) or 16.25 (fp32).
        loss_forward = T * (o * V + 4 * V)
        loss_peak = T * 12 * V
    else:
        loss_forward = loss_peak = T * 4 * (d.hidden + 3 * s.num_labels)

    # autocast casts fp32 linear weights to bf16 on every use; the copies are saved for backward
    lin = [p for p in inv.params if p.kind == "linear" and not p.lora and not p.shadow]
    casts = s.autocast and not (s.method != "qlora" and s.dtype != "float32")
    if s.method == "qlora":
        lin = [
            p for p in lin if not p.quantizable
        ]  # 4-bit layers dequantize on their own (see working)
    copies = 2 * sum(p.numel for p in lin) if casts else 0
    head_copy = 2 * max((p.numel for p in lin if not p.quantizable), default=0) if casts else 0
    layer_copies = copies // max(1, d.layers) if casts else 0

    working = T * work_tok
    if s.method == "qlora":
        # each 4-bit layer dequantizes its weight in forward and backward (plus an fp32 copy when its gradient is fp32)
        working += inv.largest_linear(quantized_only=True) * (
            DTYPE_BYTES[s.compute_dtype] + (4 if o == 4 else 0)
        )

    # IA3 multiplies activations by learned vectors: each product saves its activation (in the
    # linear outputs' dtype) for the vector's gradient. Counted with saved-tensor hooks on
    # MiniLM-L6 (key, value, output.dense): +72 MiB of feed-forward inputs and +36 MiB of key and
    # value outputs at 32 x 64 in fp32
    if inv.ia3_saved:
        ia3 = o * inv.ia3_saved // max(1, d.layers)
        per_tok += ia3
        parts["ia3 scaled activations"] = ia3

    gc = s.gradient_checkpointing
    if gc:
        first_less = 0  # checkpointing makes the embeddings' output require grad (enable_input_require_grads)
    acts = Acts(
        per_layer=T * per_tok,
        layers=d.layers,
        checkpoints=T * r * h * d.layers if gc else 0,
        outside=T * outside_tok - T * first_less,
        loss_peak=loss_peak,
        loss_forward=loss_forward,
        working=working,
        detail={
            "per_token_per_layer": per_tok,
            "parts_per_token_per_layer": parts,
            "layer_weight_copies": layer_copies,
        },
    )
    if casts:
        if gc:
            acts.weight_copies = head_copy  # only the head's copy outlives the forward
            acts.weight_copies_forward = (
                copies if full else 0
            )  # the cast cache holds trainable weights' copies
        else:
            acts.weight_copies = copies
            acts.weight_copies_forward = copies
    return acts


def _role(family: str, parent: str, leaf: str) -> str:
    """The role of a LoRA target in its block: q, k, v, qkv, o, gate, up, down."""
    by_leaf = {
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "o_proj": "o",
        "gate_proj": "gate",
        "up_proj": "up",
        "down_proj": "down",
        "query": "q",
        "key": "k",
        "value": "v",
        "c_attn": "qkv",
        "c_fc": "up",
        "dense": "dense",
    }
    role = by_leaf.get(leaf, leaf)
    if family == "bert" and leaf == "dense":
        if parent.endswith("attention.output"):
            return "o"
        if parent.endswith("intermediate"):
            return "up"
        if parent.endswith("output"):
            return "down"
    if family == "gpt2" and leaf == "c_proj":
        return "o" if parent.endswith("attn") else "down"
    return role
