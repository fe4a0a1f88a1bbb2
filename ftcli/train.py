"""train(): one explicit training loop over ``accelerate.Accelerator``.

Optimizers (torch AdamW/Adam/SGD/RMSprop, bitsandbytes 8-bit and paged AdamW), warmup + constant /
linear / cosine schedules or reduce-on-plateau, gradient accumulation and clipping, mixed precision,
validation loss every N steps, ``metrics.jsonl``, checkpoints that ``--resume`` continues exactly,
and Ctrl-C that saves one. The same function runs under ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ftcli.data import IGNORE_INDEX, Tokenized
from ftcli.errors import FtcliError
from ftcli.recipe import Recipe
from ftcli.util import append_jsonl, atomic_dir, read_json, read_jsonl, write_json, write_jsonl


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved at ``step``."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"interrupted at step {step}")


@dataclass(frozen=True)
class Trained:
    """What training produced, for run.json and the stages after it."""

    output_dir: Path  # adapter/ or model/
    steps: int
    epochs: float
    last_train_loss: float | None
    best_val_loss: float | None
    best_val_step: int | None
    seconds: float
    tokens: int
    resumed_from: int | None
    mixed_precision: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "steps": self.steps, "epochs": round(self.epochs, 4),
                "last_train_loss": self.last_train_loss, "best_val_loss": self.best_val_loss,
                "best_val_step": self.best_val_step, "seconds": round(self.seconds, 2), "tokens": self.tokens,
                "tokens_per_s": round(self.tokens_per_s, 1), "resumed_from": self.resumed_from,
                "mixed_precision": self.mixed_precision}


# --------------------------------------------------------------------------- building blocks


def collate(features: list[dict], pad_id: int) -> dict:
    """Pad a micro-batch to its longest example (right padding; pad labels are ignored)."""
    import torch

    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    seq_labels = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long) if seq_labels else None
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        mask[i, :k] = 1
        if seq_labels:
            labels[i, :k] = torch.tensor(f["labels"])
    if not seq_labels:
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_loader(features: list[dict], batch_size: int, pad_id: int, order: list[int] | None = None):
    import torch
    from torch.utils.data import DataLoader

    data = [features[i] for i in order] if order is not None else features
    # An explicit generator: starting an iterator must not draw from the global RNG, or a resumed
    # run's dropout masks would drift from the uninterrupted run's.
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad_id),
                      generator=torch.Generator().manual_seed(0))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def build_optimizer(recipe: Recipe, model):
    import torch

    o = recipe.train.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FtcliError("the model has no trainable parameters", hint="check method.kind and method.target_modules")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    name = o.name
    if name in ("adamw8bit", "paged_adamw", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
               "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
        return cls(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=o.lr, momentum=o.momentum, eps=o.eps)
    raise AssertionError(name)  # the schema admits nothing else


def build_scheduler(recipe: Recipe, optimizer, total_steps: int):
    import torch
    from transformers import get_scheduler

    s = recipe.train.scheduler
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=s.factor, patience=s.patience)
    warmup = s.warmup_steps if s.warmup_steps is not None else math.ceil(s.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[s.name]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def resolve_mixed_precision(choice: str, device: str) -> str:
    import torch

    if choice == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if choice == "fp16" and device != "cuda":
        raise FtcliError("fp16 mixed precision needs a CUDA GPU", hint="set train.mixed_precision to bf16 or no")
    return choice


def loss_sums(model, batch: dict, task: str):
    """(summed loss, count) for a batch: per example for classification, per target token for LMs."""
    import torch
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()
    labels = batch["labels"]
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="sum"), torch.tensor(labels.numel(), device=logits.device)
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def evaluate_loss(accelerator, model, loader, task: str) -> float:
    """Mean validation loss over all processes (token-weighted for causal LMs)."""
    import torch

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            s, c = loss_sums(model, batch, task)
            total += s.double()
            count += c.double()
    total = accelerator.reduce(total, "sum")
    count = accelerator.reduce(count, "sum")
    if was_training:
        model.train()
    return (total / count).item() if count.item() else float("nan")


# --------------------------------------------------------------------------- checkpoints


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Trainable weights (safetensors), optimizer, scheduler and RNG states, and the loop position."""
    import torch
    from safetensors.torch import save_file

    target = ckpt_root / f"step-{state['global_step']:07d}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", state)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise FtcliError(f"checkpoint {ckpt} does not fit this model ({len(missing)} unknown weights, e.g. {missing[0]})",
                         hint="resume with the recipe the run started with (runs/<name>/recipe.yaml)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_json(ckpt / "state.json")


# --------------------------------------------------------------------------- the loop


def save_trained(accelerator, model, tokenizer, out_dir: Path, record: dict) -> None:
    """The final adapter (peft) or full model, plus the tokenizer and ftcli's record of both."""
    unwrapped = accelerator.unwrap_model(model)
    with atomic_dir(out_dir) as tmp:
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "ftcli.json", record)


def train(recipe: Recipe, accelerator, adapted, tokenized: dict[str, Tokenized], run_dir: Path,
          resume: bool = False, progress=None) -> Trained:
    """Train ``adapted.model`` on ``tokenized['train']``; validate on ``tokenized['validation']``."""
    import torch

    t = recipe.train
    model, tok = adapted.model, adapted.tokenizer
    train_feats = tokenized["train"].features
    val_feats = tokenized["validation"].features if "validation" in tokenized else []
    if not train_feats:
        raise FtcliError("no training examples left after tokenization")
    if t.scheduler.name == "plateau" and not val_feats:
        raise FtcliError("the plateau scheduler needs a validation split",
                         hint="set data.split.validation above 0, or use another train.scheduler.name")

    optimizer = build_optimizer(recipe, model)
    world = accelerator.num_processes
    micro_per_epoch = math.ceil(math.ceil(len(train_feats) / t.batch_size) / world)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / t.gradient_accumulation))
    # max_steps 0 is a real choice (a control run: save the starting point untrained), not "unset"
    total_steps = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    val_loader = accelerator.prepare(make_loader(val_feats, recipe.eval.batch_size, tok.pad_token_id)) if val_feats else None

    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    state = {"global_step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0, "best_val_loss": None,
             "best_val_step": None, "seconds": 0.0}
    resumed_from = None
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise FtcliError(f"nothing to resume: {ckpt_root} holds no checkpoint",
                             hint="start the run without --resume")
        state.update(load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler))
        resumed_from = state["global_step"]
        if accelerator.is_main_process:  # drop metrics logged after the checkpoint
            write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= resumed_from])
    elif accelerator.is_main_process:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)

    eval_every = t.eval_every or steps_per_epoch
    ckpt_every = t.checkpoint_every or steps_per_epoch
    global_step = state["global_step"]
    tokens_seen = state["tokens"]
    best_val, best_step = state["best_val_loss"], state["best_val_step"]
    # the loss logged next averages the micro-batches since the last log, across a resume too
    log_loss, log_micro = state.get("log_window", [0.0, 0])
    log_tokens, log_t0, log_step = 0, time.perf_counter(), state["global_step"]
    last_loss = None
    t_start = time.perf_counter() - state["seconds"]
    epoch, skip = state["epoch"], state["micro_in_epoch"]
    grad_norm = None

    def checkpoint() -> Path | None:
        path = None
        if accelerator.is_main_process:
            snap = {"global_step": global_step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                    "tokens": tokens_seen, "best_val_loss": best_val, "best_val_step": best_step,
                    "seconds": time.perf_counter() - t_start, "log_window": [log_loss, log_micro]}
            path = save_checkpoint(ckpt_root, accelerator.unwrap_model(model), optimizer, scheduler, snap,
                                   t.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    def validate() -> None:
        nonlocal best_val, best_step, log_t0
        if val_loader is None:
            return
        t_eval = time.perf_counter()
        v = evaluate_loss(accelerator, model, val_loader, recipe.task)
        log_t0 += time.perf_counter() - t_eval  # tokens/s counts training time only
        if best_val is None or v < best_val:
            best_val, best_step = v, global_step
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(v)
        if accelerator.is_main_process:
            append_jsonl(metrics_path, {"step": global_step, "epoch": round(global_step / steps_per_epoch, 4),
                                        "val_loss": v})
            if progress:
                progress.note(f"step {global_step}/{total_steps}  validation loss {v:.4f}")

    model.train()
    if progress:
        progress.start(total_steps, global_step)
    micro_in_epoch = skip
    try:
        while global_step < total_steps:
            order = epoch_order(len(train_feats), t.seed, epoch)
            loader = accelerator.prepare(make_loader(train_feats, t.batch_size, tok.pad_token_id, order))
            if skip:
                loader = accelerator.skip_first_batches(loader, skip)
            micro_in_epoch = skip
            skip = 0
            for batch in loader:
                with accelerator.accumulate(model):
                    out = model(**batch)
                    loss = out.loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_in_epoch += 1
                n_tok = accelerator.reduce(batch["attention_mask"].sum().detach(), "sum").item()
                tokens_seen += n_tok
                log_tokens += n_tok
                log_loss += loss.detach().float().item()
                log_micro += 1
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                if global_step % t.log_every == 0 or global_step == total_steps:
                    mean = accelerator.reduce(torch.tensor(log_loss / log_micro, device=accelerator.device), "mean").item()
                    now = time.perf_counter()
                    row = {"step": global_step, "epoch": round(global_step / steps_per_epoch, 4), "loss": mean,
                           "lr": optimizer.param_groups[0]["lr"],
                           "tokens_per_s": round(log_tokens / max(1e-9, now - log_t0), 1),
                           "s_per_step": round((now - log_t0) / max(1, global_step - log_step), 4),
                           "elapsed_s": round(now - t_start, 2)}
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    last_loss = mean
                    if accelerator.is_main_process:
                        append_jsonl(metrics_path, row)
                    log_loss, log_micro, log_tokens, log_t0, log_step = 0.0, 0, 0, now, global_step
                    if progress:
                        progress.update(global_step, loss=mean, lr=row["lr"], tps=row["tokens_per_s"])
                elif progress:
                    progress.update(global_step)
                if global_step % eval_every == 0 or global_step == total_steps:
                    validate()
                if global_step % ckpt_every == 0 and global_step < total_steps:
                    checkpoint()
                if global_step >= total_steps:
                    break
            else:  # the epoch ran out before total_steps
                epoch += 1
                micro_in_epoch = 0
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        path = checkpoint()
        raise Interrupted(global_step, path) from None
    if progress:
        progress.stop()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t_start
    out_dir = run_dir / ("model" if recipe.method.kind == "full" else "adapter")
    if accelerator.is_main_process:
        method = recipe.method.model_dump(mode="json")
        if recipe.method.kind == "qlora":
            method["quantization"] = recipe.method.quant.model_dump(mode="json")
        id2label = getattr(accelerator.unwrap_model(model).config, "id2label", None)
        record = {"base_model": recipe.model.name, "base_model_dir": adapted.model_dir, "task": recipe.task,
                  "method": method, "steps": global_step,
                  "labels": [id2label[i] for i in range(len(id2label))] if recipe.task == "classification" else None}
        save_trained(accelerator, model, tok, out_dir, record)
    accelerator.wait_for_everyone()
    return Trained(out_dir, global_step, global_step / steps_per_epoch, last_loss, best_val, best_step,
                   seconds, tokens_seen, resumed_from, accelerator.mixed_precision)
