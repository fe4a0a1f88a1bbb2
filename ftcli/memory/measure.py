"""``--measure``: a few real training steps, and the peak memory they reached.

Each measurement runs in a fresh process (``python -m ftcli.memory.measure SPEC``) so that nothing
an earlier model left behind counts. On CUDA the figure is ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. On the CPU it is the growth of the process's peak resident
memory (``VmHWM``) over a baseline read after the imports and the tokenizer; the kernel's
``clear_refs`` reset lets the load and the training steps be read separately where it works.

The steps are ftcli's own: ``adapt()`` loads and adapts the model as ``ftcli train`` does, the
optimizer comes from ``build_optimizer``, and every micro-batch is full length (``batch_size`` x
``max_length`` tokens), the worst case the estimate describes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ftcli.adapt import adapt
from ftcli.data.chat import recipe_tokenizer
from ftcli.data.tokenize import padded_width
from ftcli.errors import FtcliError
from ftcli.forward import loss_sums
from ftcli.memory.arch import build_meta, layer_dims
from ftcli.memory.preflight import pin_malloc_threshold
from ftcli.models import weight_dtype_of
from ftcli.precision import resolve_mixed_precision
from ftcli.recipe import recipe_from_mapping
from ftcli.sources import local_model_dir, resolve_model, trusting
from ftcli.train import build_optimizer
from ftcli.ui import quiet_libraries


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    rss = _status_kib("VmRSS")
    return (rss or 0) * 1024


def _import_everything(model_dir: str, task: str) -> None:
    """Import every library and the model's own modeling module before the baseline is read, so
    that code loaded on first use does not count as training memory."""
    import gc

    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: F401
    from transformers import AutoConfig

    build_meta(AutoConfig.from_pretrained(model_dir), task)
    gc.collect()


def run_measurement(
    recipe_yaml: str, device: str, steps: int = 3, loss_path: str = "transformers"
) -> dict:
    """In this process: load, adapt and train ``steps`` full-length micro-batches; return the peaks.
    ``loss_path`` ftcli: the loop's own loss (ftcli.forward.loss_sums); transformers: the
    model's (``out.loss`` over the full logits)."""

    quiet_libraries()
    import yaml

    recipe = recipe_from_mapping(yaml.safe_load(recipe_yaml))
    with trusting(recipe.model.trust_remote_code):  # the user's own recipe decides
        return _measure(recipe, device, steps, loss_path)


def _measure(recipe, device: str, steps: int, loss_path: str) -> dict:
    import torch
    from accelerate import Accelerator

    mp = resolve_mixed_precision(
        recipe.train.mixed_precision,
        device,
        recipe,
        layer_dims(recipe),
        weight_dtype_of(recipe, device),
    )
    acc = Accelerator(mixed_precision=mp, cpu=device == "cpu")
    tokenizer, _, model_dir = recipe_tokenizer(recipe)
    labels = None
    if recipe.task == "classification":
        labels = list(recipe.data.labels) if recipe.data.labels else ["0", "1"]
    cuda = device == "cuda"
    if not cuda:
        pin_malloc_threshold(
            measuring=True
        )  # resident memory = live tensors (FTCLI_PIN_MALLOC=0 to compare)
    _import_everything(model_dir, recipe.task)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        resettable = reset_peak_rss()
        base = current_rss_bytes()
    adapted = adapt(recipe, tokenizer, model_dir, labels, device)
    model = adapted.model
    if cuda:
        after_load = torch.cuda.memory_allocated() - base
        load_peak = torch.cuda.max_memory_allocated() - base
    else:
        after_load = current_rss_bytes() - base
        load_peak = peak_rss_bytes() - base
        if resettable:
            reset_peak_rss()
    optimizer = build_optimizer(recipe, model)
    model, optimizer = acc.prepare(model, optimizer)
    b, n = recipe.train.batch_size, padded_width(recipe.data.max_length)  # as collate pads
    vocab = (
        model.get_input_embeddings().num_embeddings
        if hasattr(model, "get_input_embeddings")
        else tokenizer.vocab_size
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, len(tokenizer)), (b, n), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if recipe.task == "classification":
        batch["labels"] = torch.randint(0, len(labels), (b,), generator=g)
    else:
        batch["labels"] = ids.clone()
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    model.train()
    losses = []
    import time

    t0 = time.perf_counter()
    for step in range(steps):
        if step == 1:
            t0 = (
                time.perf_counter()
            )  # the first step warms kernels and creates the optimizer states
        if loss_path == "ftcli":
            with acc.autocast():  # as the loop: the LM head runs outside the model's forward
                total, count = loss_sums(model, batch, recipe.task)
            loss = total / count.clamp(min=1)
        else:
            loss = model(**batch).loss
        acc.backward(loss)
        if recipe.train.max_grad_norm:
            acc.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        del loss
    seconds_per_step = (time.perf_counter() - t0) / max(1, steps - 1)
    if cuda:
        torch.cuda.synchronize()
        train_peak = torch.cuda.max_memory_allocated() - base
        peak = train_peak
    else:
        train_peak = peak_rss_bytes() - base
        peak = max(load_peak, train_peak) if resettable else train_peak
    return {
        "device": device,
        "steps": steps,
        "batch_size": b,
        "seq_len": n,
        "peak": int(peak),
        "load_peak": int(load_peak),
        "after_load": int(after_load),
        "train_peak": int(train_peak),
        "baseline": int(base),
        "losses": losses,
        "seconds_per_step": round(seconds_per_step, 3),
        "loss_path": loss_path,
        "quantity": "torch.cuda.max_memory_allocated"
        if cuda
        else "peak RSS growth over the post-import baseline",
    }


def measure(
    recipe, device: str, steps: int = 3, timeout: float = 1800, loss_path: str = "transformers"
) -> dict:
    """Run ``run_measurement`` in a fresh Python process and return its result."""

    local_model_dir(
        resolve_model(recipe.model.name, recipe.model.revision)
    )  # convert a GGUF once, here
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(recipe.to_yaml())
        path = f.name
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ftcli.memory.measure", path, device, str(steps), loss_path],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise FtcliError(
            f"the measurement did not finish within {timeout:.0f} s",
            hint="lower train.batch_size or data.max_length",
        ) from None
    finally:
        os.unlink(path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FtcliError("the measurement run failed:\n  " + "\n  ".join(tail))
    return json.loads(lines[-1])


def _main(argv: list[str]) -> None:
    path, device, steps, loss_path = argv[0], argv[1], int(argv[2]), argv[3]
    result = run_measurement(Path(path).read_text(), device, steps, loss_path)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1:])
