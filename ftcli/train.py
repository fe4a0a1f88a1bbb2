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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ftcli.data.tokenize import Tokenized, collate
from ftcli.errors import FtcliError, Interrupted
from ftcli.evaluation.forward import loss_sums
from ftcli.recipe import Recipe
from ftcli.rundir import model_record_for, write_model_record
from ftcli.util import append_jsonl, atomic_dir, read_json, read_jsonl, write_json, write_jsonl


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
    pruned_at: int | None = None  # the step a study's pruner stopped this run at (ftcli tune)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "output_dir": str(self.output_dir),
            "steps": self.steps,
            "epochs": round(self.epochs, 4),
            "last_train_loss": self.last_train_loss,
            "best_val_loss": self.best_val_loss,
            "best_val_step": self.best_val_step,
            "seconds": round(self.seconds, 2),
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "resumed_from": self.resumed_from,
            "mixed_precision": self.mixed_precision,
            "pruned_at": self.pruned_at,
        }


# --------------------------------------------------------------------------- building blocks


def make_loader(features: list[dict], batch_size: int, pad_id: int, order: list[int] | None = None):
    data = [features[i] for i in order] if order is not None else features
    # An explicit generator: starting an iterator must not draw from the global RNG, or a resumed
    # run's dropout masks would drift from the uninterrupted run's.
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda b: collate(b, pad_id),
        generator=torch.Generator().manual_seed(0),
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def build_optimizer(recipe: Recipe, model):
    o = recipe.train.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FtcliError(
            "the model has no trainable parameters",
            hint="check method.kind and method.target_modules",
        )
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    name = o.name
    if name in ("adamw8bit", "paged_adamw", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = {
            "adamw8bit": bnb.optim.AdamW8bit,
            "paged_adamw": bnb.optim.PagedAdamW,
            "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        }[name]
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
    s = recipe.train.scheduler
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=s.factor, patience=s.patience
        )
    warmup = (
        s.warmup_steps if s.warmup_steps is not None else math.ceil(s.warmup_ratio * total_steps)
    )
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[s.name]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def evaluate_loss(accelerator, model, loader, task: str) -> float:
    """Mean validation loss over all processes (token-weighted for causal LMs)."""
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
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Trainable weights (safetensors), optimizer, scheduler and RNG states, and the loop position."""
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
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise FtcliError(
            f"checkpoint {ckpt} does not fit this model ({len(missing)} unknown weights, e.g. {missing[0]})",
            hint="resume with the recipe the run started with (runs/<name>/recipe.yaml)",
        )
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


@dataclass(frozen=True)
class Pruning:
    """A study trial watching this run's validation curve (``ftcli tune``). A plain record that
    one ``if`` in the loop reads, not a callback: the loop stays one visible function. ``trial``
    is an ``optuna.Trial``; ``metric`` is what it is told at each validation."""

    trial: object
    metric: str = "validation_loss"  # or a classification metric: accuracy, macro_f1


def validation_score(model, features: list[dict], pad_id: int, batch_size: int, device, p: Pruning):
    """The pruning metric on the validation features (the test split is never read here)."""
    from ftcli.evaluation.forward import class_probabilities
    from ftcli.evaluation.metrics import classification_summary

    probs = class_probabilities(model, features, pad_id, batch_size, device)
    model.train()
    names = [str(i) for i in range(len(probs[0]))]
    return classification_summary([f["labels"] for f in features], probs, names)[p.metric]


def save_trained(accelerator, model, tokenizer, out_dir: Path, record) -> None:
    """The final adapter (peft) or full model, plus the tokenizer and ftcli's record of both."""
    unwrapped = accelerator.unwrap_model(model)
    with atomic_dir(out_dir) as tmp:
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_model_record(tmp, record)


@dataclass
class LoopState:
    """Where the loop is; what a checkpoint saves and ``--resume`` restores (state.json)."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    best_val_step: int | None = None
    seconds: float = 0.0
    log_window: list = field(
        default_factory=lambda: [0.0, 0]
    )  # loss sum, micro-batches since the last log

    def snapshot(self, seconds: float) -> dict:
        return {**asdict(self), "seconds": seconds}


@dataclass
class LogWindow:
    """Throughput since the last log row (training time only: validation is subtracted)."""

    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    step: int = 0


def log_row(
    accelerator,
    state: LoopState,
    window: LogWindow,
    lr: float,
    grad_norm,
    steps_per_epoch: int,
    t_start: float,
) -> dict:
    """One metrics.jsonl row: the loss averaged over the window's micro-batches and processes."""
    loss_sum, micro = state.log_window
    mean = accelerator.reduce(
        torch.tensor(loss_sum / micro, device=accelerator.device), "mean"
    ).item()
    now = time.perf_counter()
    row = {
        "step": state.global_step,
        "epoch": round(state.global_step / steps_per_epoch, 4),
        "loss": mean,
        "lr": lr,
        "tokens_per_s": round(window.tokens / max(1e-9, now - window.t0), 1),
        "s_per_step": round((now - window.t0) / max(1, state.global_step - window.step), 4),
        "elapsed_s": round(now - t_start, 2),
    }
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    return row


def train(
    recipe: Recipe,
    accelerator,
    adapted,
    tokenized: dict[str, Tokenized],
    run_dir: Path,
    resume: bool = False,
    progress=None,
    pruning: Pruning | None = None,
) -> Trained:
    """Train ``adapted.model`` on ``tokenized['train']``; validate on ``tokenized['validation']``.

    With ``pruning``, each validation is reported to the study's trial, and the run stops early
    (saved as it stands) when the pruner says the trial is weak."""
    t = recipe.train
    model, tok = adapted.model, adapted.tokenizer
    train_feats = tokenized["train"].features
    val_feats = tokenized["validation"].features if "validation" in tokenized else []
    if not train_feats:
        raise FtcliError("no training examples left after tokenization")
    if t.scheduler.name == "plateau" and not val_feats:
        raise FtcliError(
            "the plateau scheduler needs a validation split",
            hint="set data.split.validation above 0, or use another train.scheduler.name",
        )

    optimizer = build_optimizer(recipe, model)
    world = accelerator.num_processes
    micro_per_epoch = math.ceil(math.ceil(len(train_feats) / t.batch_size) / world)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / t.gradient_accumulation))
    # max_steps 0 is a real choice (a control run: save the starting point untrained), not "unset"
    total_steps = (
        t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
    )
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    model, optimizer = accelerator.prepare(model, optimizer)
    val_loader = None
    if val_feats:
        val_loader = accelerator.prepare(
            make_loader(val_feats, recipe.eval.batch_size, tok.pad_token_id)
        )
    main = accelerator.is_main_process

    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    state = LoopState()
    resumed_from = None
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise FtcliError(
                f"nothing to resume: {ckpt_root} holds no checkpoint",
                hint="start the run without --resume",
            )
        saved = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        state = LoopState(**{k: v for k, v in saved.items() if k in LoopState.__dataclass_fields__})
        resumed_from = state.global_step
        if main:  # drop metrics logged after the checkpoint
            write_jsonl(
                metrics_path,
                [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= resumed_from],
            )
    elif main:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)

    eval_every = t.eval_every or steps_per_epoch
    ckpt_every = t.checkpoint_every or steps_per_epoch
    window = LogWindow(step=state.global_step)
    t_start = time.perf_counter() - state.seconds
    skip = state.micro_in_epoch
    last_loss = grad_norm = pruned_at = None

    def checkpoint() -> Path | None:
        path = None
        if main:
            path = save_checkpoint(
                ckpt_root,
                accelerator.unwrap_model(model),
                optimizer,
                scheduler,
                state.snapshot(time.perf_counter() - t_start),
                t.keep_checkpoints,
            )
        accelerator.wait_for_everyone()
        return path

    model.train()
    if progress:
        progress.start(total_steps, state.global_step)
    try:
        while state.global_step < total_steps and pruned_at is None:
            order = epoch_order(len(train_feats), t.seed, state.epoch)
            loader = accelerator.prepare(
                make_loader(train_feats, t.batch_size, tok.pad_token_id, order)
            )
            if skip:
                loader = accelerator.skip_first_batches(loader, skip)
            state.micro_in_epoch, skip = skip, 0
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients and not plateau:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.micro_in_epoch += 1
                n_tok = accelerator.reduce(batch["attention_mask"].sum().detach(), "sum").item()
                state.tokens += n_tok
                window.tokens += n_tok
                state.log_window = [
                    state.log_window[0] + loss.detach().float().item(),
                    state.log_window[1] + 1,
                ]
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                step = state.global_step
                if step % t.log_every == 0 or step == total_steps:
                    row = log_row(
                        accelerator,
                        state,
                        window,
                        optimizer.param_groups[0]["lr"],
                        grad_norm,
                        steps_per_epoch,
                        t_start,
                    )
                    last_loss = row["loss"]
                    if main:
                        append_jsonl(metrics_path, row)
                    state.log_window = [0.0, 0]
                    window = LogWindow(step=step)
                    if progress:
                        progress.update(
                            step, loss=row["loss"], lr=row["lr"], tps=row["tokens_per_s"]
                        )
                elif progress:
                    progress.update(step)
                if val_loader is not None and (step % eval_every == 0 or step == total_steps):
                    t_eval = time.perf_counter()
                    v = evaluate_loss(accelerator, model, val_loader, recipe.task)
                    window.t0 += time.perf_counter() - t_eval  # tokens/s counts training time only
                    if state.best_val_loss is None or v < state.best_val_loss:
                        state.best_val_loss, state.best_val_step = v, step
                    if plateau:
                        scheduler.step(v)
                    if main:
                        append_jsonl(
                            metrics_path,
                            {
                                "step": step,
                                "epoch": round(step / steps_per_epoch, 4),
                                "val_loss": v,
                            },
                        )
                    if progress:
                        progress.note(f"step {step}/{total_steps}  validation loss {v:.4f}")
                    if pruning is not None:
                        score = v
                        if pruning.metric != "validation_loss":
                            score = validation_score(
                                model,
                                val_feats,
                                tok.pad_token_id,
                                recipe.eval.batch_size,
                                accelerator.device,
                                pruning,
                            )
                        pruning.trial.report(score, step)
                        if step < total_steps and pruning.trial.should_prune():
                            pruned_at = step
                            break
                if step % ckpt_every == 0 and step < total_steps:
                    checkpoint()
                if step >= total_steps:
                    break
            else:  # the epoch ran out before total_steps
                state.epoch += 1
                state.micro_in_epoch = 0
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        path = checkpoint()
        raise Interrupted(state.global_step, path) from None
    if progress:
        progress.stop()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t_start
    out_dir = run_dir / ("model" if recipe.method.kind == "full" else "adapter")
    if main:
        id2label = getattr(accelerator.unwrap_model(model).config, "id2label", None)
        labels = (
            [id2label[i] for i in range(len(id2label))] if recipe.task == "classification" else None
        )
        save_trained(
            accelerator,
            model,
            tok,
            out_dir,
            model_record_for(recipe, adapted.model_dir, state.global_step, labels),
        )
    accelerator.wait_for_everyone()
    return Trained(
        out_dir,
        state.global_step,
        state.global_step / steps_per_epoch,
        last_loss,
        state.best_val_loss,
        state.best_val_step,
        seconds,
        state.tokens,
        resumed_from,
        accelerator.mixed_precision,
        pruned_at,
    )
