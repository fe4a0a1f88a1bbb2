"""What a training run looks like to the memory estimate (``Setup``), and the units it speaks:
dtype sizes, byte formatting, memory budgets. Shared by estimate, activations and report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from ftcli.errors import FtcliError
from ftcli.recipe import OptimizerName

GiB = 1024**3
GB = 1000**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CUDA_CONTEXT = (
    512 * 1024**2
)  # CUDA context + cuBLAS workspace (CUDA 12, lazy module loading); not in max_memory_allocated
LOSS_PATHS = ("ftcli", "transformers")
LOSS_CHUNK = (
    1024  # = ftcli.forward.CE_CHUNK (a test keeps them equal; this module stays torch-free)
)
METHODS = ("full", "lora", "qlora", "ia3", "prefix", "prompt", "ptuning", "vera")
OPTIMIZERS = get_args(OptimizerName)  # the recipe's train.optimizer.name


def parse_budget(text: str) -> int:
    """``24GB`` / ``24GiB`` / ``24000MB`` / ``1.5TB`` -> bytes. GB is 1000^3, GiB 1024^3."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", text or "", re.IGNORECASE)
    if not m:
        raise FtcliError(
            f"cannot read the memory budget {text!r}",
            hint="write a number and a unit: 24GB, 24GiB, 16000MB, 80G is not enough - say GB or GiB",
        )
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if not unit:
        raise FtcliError(
            f"the memory budget {text!r} has no unit",
            hint="write 24GB (10^9 bytes) or 24GiB (2^30 bytes)",
        )
    powers = {
        "B": 1,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
    }
    return int(value * powers[unit])


def human(n: float) -> str:
    """Bytes as GiB/MiB with 2-3 significant decimals."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class Setup:
    """Everything about a training run that decides its memory, and nothing else."""

    task: str = "causal_lm"  # causal_lm | classification
    method: str = "lora"  # full | lora | qlora | ia3 | prefix | prompt | ptuning | vera
    batch_size: int = 8
    seq_len: int = 128
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    dtype: str = "float32"  # weights of full / lora runs (ftcli loads float32 unless model.dtype says otherwise)
    unquantized_dtype: str = (
        "float32"  # qlora: embeddings, norms, head (peft's prepare_model_for_kbit_training upcasts)
    )
    adapter_dtype: str = "float32"  # peft keeps LoRA weights in fp32
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast around the forward
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    quant_bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple | str | None = None
    modules_to_save: tuple | None = None
    num_labels: int = 2
    device: str = "cuda"  # cuda | cpu
    num_devices: int = 1
    strategy: str = "ddp"  # ddp | fsdp
    cuda_context: int = CUDA_CONTEXT
    checkpoint_bytes: int | None = None  # CPU: size of the weights file read at load time
    zero_grad_to_none: bool = (
        True  # ftcli frees gradients after each step; torch < 2.0's zero_grad() kept them
    )
    fp32_embedding_states: bool = False  # HF Trainer keeps 8-bit optimizers' states of nn.Embedding in 32 bits; ftcli does not
    quantize_targets_only: bool = (
        False  # torchtune's QLoRA quantizes only the LoRA-adapted layers; bitsandbytes all linears
    )
    # causal LM: "transformers" = the model's own loss over the full [tokens, vocab] logits (what
    # published peaks measure); "ftcli" = the LM head on supervised positions only, LOSS_CHUNK at
    # a time, recomputed in backward (what ftcli's loop runs: ftcli.forward)
    loss_path: str = "transformers"
    # preference tuning (issue 23): a frozen second copy of the weights as the reference model
    # (full fine-tuning, or a reference named apart from the start; none when it is the policy
    # with its adapter disabled or was scored before training). The doubled sequences of a pair
    # batch are in batch_size already.
    reference_copy: bool = False

    def check(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.loss_path not in LOSS_PATHS:
            problems.append(f"loss path {self.loss_path!r} is not one of {', '.join(LOSS_PATHS)}")
        if self.strategy not in ("ddp", "fsdp"):
            problems.append(f"strategy {self.strategy!r} is not one of ddp, fsdp")
        if self.batch_size < 1 or self.seq_len < 1 or self.num_devices < 1:
            problems.append("batch size, sequence length and device count must be at least 1")
        if self.attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
            problems.append(
                f"attention {self.attn_implementation!r} is not one of eager, sdpa, flash_attention_2"
            )
        for name in ("dtype", "unquantized_dtype", "adapter_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                problems.append(
                    f"{name} {getattr(self, name)!r} is not one of {', '.join(DTYPE_BYTES)}"
                )
        if problems:
            raise FtcliError("; ".join(problems))

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def autocast(self) -> bool:
        return self.mixed_precision in ("bf16", "fp16")
