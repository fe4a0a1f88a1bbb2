"""``ftcli train``'s memory check before any weights are read: the estimate against the free
memory of the device, and glibc's heap, which can hold more resident than the live tensors.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.memory.estimate import Estimate
from ftcli.memory.plan import plan_recipe
from ftcli.memory.setup import human

MMAP_THRESHOLD = 64 * 1024


def malloc_pinned_by_default(measuring: bool) -> bool:
    """Whether this process should pin glibc's mmap threshold: FTCLI_PIN_MALLOC=1 always, =0 never;
    unset: only when measuring (``estimate-memory --measure``, bench/memory.py)."""
    import os

    flag = os.environ.get("FTCLI_PIN_MALLOC")
    return measuring if flag is None else flag == "1"


def pin_malloc_threshold(measuring: bool = False, threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc serve every allocation above ``threshold`` with its own mmap, returned on free.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
    the activation buffers of one step are carved from the heap and stay resident after they are
    freed: a CPU run's resident memory then grows well past what its tensors hold (1.6-2.4x on the
    quickstart, see CPU_HEAP_RETENTION).
    Pinning the threshold (what MALLOC_MMAP_THRESHOLD_ does) keeps resident memory equal to live
    tensors, which is what the estimate counts, but every large allocation then maps fresh pages:
    the quickstart's steps ran 1.7x slower (986 vs 1,654 tokens/s; peak RSS 1.16 vs 1.78 GB). So
    ``ftcli train`` leaves glibc alone unless FTCLI_PIN_MALLOC=1; measurements pin it (see
    ``malloc_pinned_by_default``). No-op (False) where the C library is not glibc.
    """
    if not malloc_pinned_by_default(measuring):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


# Resident memory under glibc's default heap, over the estimate's live tensors, measured on the
# quickstart (499.5 MiB estimated): 3 steps under `FTCLI_PIN_MALLOC=0 ftcli estimate-memory --measure`
# grew RSS by 798.8 MiB over the post-import baseline (1.6x); the whole 200-step `ftcli train` run
# (data, evaluation and merge included) peaked at 1,733 MiB RSS over a 522 MiB baseline (2.4x).
# Train's CPU check warns with this factor and refuses only on the live tensors themselves.
CPU_HEAP_RETENTION = 2.5


def free_device_memory(device: str) -> int | None:
    """Free bytes on the device training will use: CUDA's mem_get_info, or MemAvailable on Linux."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_device(est: Estimate, free: int | None, margin: float = 1.10) -> str | None:
    """A message when the estimate clearly exceeds the free memory (by more than 10%), else None."""
    if free is None or est.total <= free * margin:
        return None

    return (
        f"the run needs about {human(est.total)} at its peak ({est.peak_phase}) but the {est.setup.device} has "
        f"{human(free)} free"
    )


def preflight(recipe, device: str, ui, enforce: bool = True, processes: int = 1) -> dict | None:
    """``ftcli train``'s check: print the estimate, and stop when it clearly exceeds free memory.

    ``processes`` on the CPU share one machine's RAM, so their estimates add up. Returns a small
    record for run.json, or None when the model's architecture cannot be estimated (said on
    screen; training goes on)."""

    pinned = device == "cpu" and pin_malloc_threshold()
    try:
        est = plan_recipe(recipe, device).estimate()
    except FtcliError as exc:
        ui.info(f"  memory estimate unavailable: {exc.message}")
        return None
    free = free_device_memory(device)
    if device == "cpu" and processes > 1:
        est = replace(est, total=est.total * processes)
    heap = device == "cpu" and not pinned
    ui.info(
        f"  {human(est.total)} of tensors at the peak ({est.peak_phase}"
        + (f", {processes} processes" if device == "cpu" and processes > 1 else "")
        + ")"
        + (
            f", up to {human(est.total * CPU_HEAP_RETENTION)} resident under glibc's heap"
            if heap
            else ""
        )
        + (f"; {human(free)} free" if free is not None else "")
    )
    problem = check_fits_device(est, free)
    if problem and enforce:
        raise FtcliError(
            problem,
            hint="lower train.batch_size or data.max_length, set train.gradient_checkpointing: "
            "true, use method.kind qlora; or run anyway with --no-memory-check",
        )
    if problem:
        ui.info(f"  [yellow]warning[/]: {problem} (--no-memory-check: going on)")
    elif heap and check_fits_device(replace(est, total=int(est.total * CPU_HEAP_RETENTION)), free):
        ui.info(
            "  [yellow]warning[/]: glibc's heap may keep more resident than is free; FTCLI_PIN_MALLOC=1 "
            "holds resident memory to the live tensors (steps run slower)"
        )
    return {
        "estimated_peak": est.total,
        "peak_phase": est.peak_phase,
        "free": free,
        "malloc_pinned": pinned,
    }
