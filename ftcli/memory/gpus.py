"""The GPUs ``estimate-memory --gpu CARD`` can plan for: memory as sold and bf16 support.

A card sold as N GB holds N GiB to torch less ~1% (``estimate.card_capacity``). bf16 needs compute
capability 8.0 (Ampere) or later: a T4 or V100 trains in fp16 mixed precision instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: int
    bf16: bool
    label: str

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16"


GPUS = {
    g.name: g
    for g in (
        Gpu("h200", 141, True, "NVIDIA H200 141 GB"),
        Gpu("h100", 80, True, "NVIDIA H100 80 GB"),
        Gpu("a100-80gb", 80, True, "NVIDIA A100 80 GB"),
        Gpu("a100-40gb", 40, True, "NVIDIA A100 40 GB"),
        Gpu("l40s", 48, True, "NVIDIA L40S 48 GB"),
        Gpu("a6000", 48, True, "NVIDIA RTX A6000 48 GB"),
        Gpu("l4", 24, True, "NVIDIA L4 24 GB"),
        Gpu("a10g", 24, True, "NVIDIA A10G 24 GB (AWS g5)"),
        Gpu("rtx4090", 24, True, "GeForce RTX 4090 24 GB"),
        Gpu("rtx3090", 24, True, "GeForce RTX 3090 24 GB"),
        Gpu("rtx4080", 16, True, "GeForce RTX 4080 16 GB"),
        Gpu("t4", 16, False, "NVIDIA T4 16 GB (no bf16)"),
        Gpu("v100", 16, False, "NVIDIA V100 16 GB (no bf16)"),
        Gpu("v100-32gb", 32, False, "NVIDIA V100 32 GB (no bf16)"),
    )
}
