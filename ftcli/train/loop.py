"""train(): one explicit training loop over ``accelerate.Accelerator``.

Optimizers (torch AdamW/Adam/SGD/RMSprop, bitsandbytes 8-bit and paged AdamW), warmup + constant /
linear / cosine schedules or reduce-on-plateau, gradient accumulation and clipping, mixed precision,
validation loss every N steps, ``metrics.jsonl``, checkpoints that ``--resume`` continues exactly,
and Ctrl-C that saves one. The same function runs under ``torchrun`` / ``accelerate launch``.
The helpers below are the loop's chunks (its state, one step, a log row, a checkpoint, the save),
called from it in plain sight: no callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ftcli.adapt import INIT_ADAPTER
from ftcli.data.rows import lengths_of
from ftcli.data.stream import steps as streamed_steps
from ftcli.data.tokenize import Tokenized
from ftcli.errors import FtcliError, Interrupted, TrainingStopped
from ftcli.forward import loss_sums
from ftcli.models import pads_left
from ftcli.recipe import Recipe, TrainSpec
from ftcli.rundir import model_record_for
from ftcli.strategies import unfreezing
from ftcli.testpoints import PAUSE, pause
from ftcli.train.batching import (
    collator,
    epoch_batches,
    make_loader,
    optimizer_steps,
    targets_in,
    varlen_attention,
)
from ftcli.train.checkpoints import Checkpointer, save_trained
from ftcli.train.optim import build_optimizer, build_scheduler
from ftcli.train.validation import Pruning, after_validation, evaluate_loss
from ftcli.util import append_jsonl, read_jsonl, write_jsonl


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
    stopped_at: int | None = None  # early stopping: the step it stopped at (None: ran to the end)
    best_step: int | None = None  # early stopping: the step whose weights were kept
    pruned_at: int | None = None  # the step a study's pruner stopped this run at (ftcli tune)
    processed_tokens: int = 0  # positions the model ran on, padding included
    packed: bool = False

    @property
    def tokens_per_s(self) -> float:
        """Real (non-pad) tokens per second of training."""
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_efficiency(self) -> float | None:
        """Real tokens / processed tokens: 1.0 means no compute went to padding."""
        return self.tokens / self.processed_tokens if self.processed_tokens else None

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
            "padding_efficiency": (
                round(self.padding_efficiency, 4) if self.padding_efficiency is not None else None
            ),
            "packed": self.packed,
            "resumed_from": self.resumed_from,
            "mixed_precision": self.mixed_precision,
            "stopped_at": self.stopped_at,
            "best_step": self.best_step,
            "pruned_at": self.pruned_at,
        }


def loss_trouble(accelerator, loss, lowest: float | None, spike: float | None):
    """(the micro-batch loss, the worst over processes; why training must stop, or None)."""
    v = loss.detach().float().reshape(())
    if accelerator.num_processes > 1:  # every process stops together, or none does
        v = accelerator.reduce(torch.nan_to_num(v, nan=float("inf")), "max")
    value = v.item()
    if not math.isfinite(value):
        return value, f"the loss is {value}"
    if spike and lowest is not None and lowest > 0 and value > spike * lowest:
        return value, (
            f"the loss {value:.4g} is over train.max_loss_spike ({spike:g}) times the lowest "
            f"so far ({lowest:.4g})"
        )
    return value, None


def stopped(
    why: str,
    state,
    recipe: Recipe,
    rows: list[int],
    world: int,
    last_ckpt,
    run_dir: Path,
    applied: bool = False,
) -> TrainingStopped:
    """One message: the step, the likely causes (with the rows of the batch), what was kept."""
    t = recipe.train
    where = ""
    if world == 1 and not applied and rows:
        idx = sorted(i + 1 for i in rows)
        where = f" (lines {', '.join(map(str, idx[:8]))}{'...' if len(idx) > 8 else ''} of "
        where += f"{run_dir / 'data' / 'train.jsonl'})"
    kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved"
    step = state.global_step if applied else state.global_step + 1
    nothing = "nothing was saved" if applied else "nothing from this step was applied or saved"
    return TrainingStopped(
        f"training stopped at step {step}: {why}; {nothing}, {kept}",
        hint=f"likely causes: a learning rate too high (train.optimizer.lr: {t.optimizer.lr:g}), "
        "fp16 overflow (train.mixed_precision: bf16 or no), or a bad data row in this batch"
        f"{where}",
    )


def speed_up(recipe: Recipe, model):
    """The opt-in kernels: Liger's (CUDA; the loss stays ftcli's chunked one) and torch.compile."""
    t = recipe.train
    if t.kernels == "liger":
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            raise FtcliError(
                "train.kernels is 'liger' but liger-kernel is not installed",
                hint="pip install 'ftcli[liger]', or set train.kernels to none",
            ) from None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        _apply_liger_kernel_to_instance(
            model=inner, cross_entropy=False, fused_linear_cross_entropy=False
        )
    if t.compile:  # in place: the module keeps its type, so saving and peft see the same model
        model.compile()
    return model


@dataclass
class LoopState:
    """Where the loop is; what a checkpoint saves and ``--resume`` restores (state.json)."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    tokens: int = 0
    processed_tokens: int = 0
    best_val_loss: float | None = None
    best_val_step: int | None = None
    lowest_loss: float | None = None  # lowest micro-batch loss so far (train.max_loss_spike)
    bad_validations: int = 0  # early stopping: validations since the last improvement
    stopped_at: int | None = None
    seconds: float = 0.0
    log_window: list = field(
        default_factory=lambda: [0.0, 0]
    )  # loss sum, optimizer steps since the last log

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
    """One metrics.jsonl row: the loss averaged over the window's steps (each already the mean over
    its real targets on all processes); tokens/s counts real tokens."""
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


# --------------------------------------------------------------------------- the loop's chunks


def splits(tokenized: dict[str, Tokenized], *, recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """The training and validation features, refusing a run that has nothing to train on or a
    plateau scheduler without a validation split."""
    train_feats = tokenized["train"].features
    val_feats = tokenized["validation"].features if "validation" in tokenized else []
    if not train_feats:
        raise FtcliError("no training examples left after tokenization")
    if recipe.train.scheduler.name == "plateau" and not val_feats:
        raise FtcliError(
            "the plateau scheduler needs a validation split",
            hint="set data.split.validation above 0, or use another train.scheduler.name",
        )
    return train_feats, val_feats


def step_counts(t: TrainSpec, *, micro_batches: int, world: int, progress) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for an epoch of ``micro_batches`` shared by
    ``world`` processes: train.max_steps, else train.epochs' worth (a note when both disagree)."""
    micro_per_epoch = math.ceil(micro_batches / world)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / t.gradient_accumulation))
    # max_steps 0 is a real choice (a control run: save the starting point untrained), not "unset"
    total_steps = (
        t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
    )
    if progress and t.max_steps and "epochs" in t.model_fields_set:
        by_epochs = max(1, math.ceil(t.epochs * steps_per_epoch))
        if by_epochs != t.max_steps:
            progress.note(
                f"note: train.max_steps={t.max_steps} wins over train.epochs={t.epochs:g}: "
                f"{t.max_steps} steps are {t.max_steps / steps_per_epoch:.2g} epochs of "
                f"{steps_per_epoch} steps (remove one of the two)"
            )
    return steps_per_epoch, total_steps


def start_state(
    checkpointer: Checkpointer, *, resume: bool, metrics_path: Path, main: bool
) -> LoopState:
    """Where the loop starts: the latest checkpoint (``--resume``; metrics logged after it are
    dropped), else step 0 with the run's earlier checkpoints and metrics removed."""
    if not resume:
        if main:
            checkpointer.clear()
            metrics_path.unlink(missing_ok=True)
        return LoopState()
    saved = checkpointer.resume()
    state = LoopState(**{k: v for k, v in saved.items() if k in LoopState.__dataclass_fields__})
    if main:  # drop metrics logged after the checkpoint
        write_jsonl(
            metrics_path,
            [
                r
                for r in read_jsonl(metrics_path, partial_tail=True)
                if r.get("step", 0) <= state.global_step
            ],
        )
    return state


def train_step(
    group: list[dict],
    *,
    accelerator,
    model,
    optimizer,
    scheduler,
    state: LoopState,
    window: LogWindow,
    recipe: Recipe,
    batches: list[list[int]],
    checkpointer: Checkpointer,
    run_dir: Path,
):
    """One optimizer step over the micro-batches of ``group``: forward and backward each (a NaN or
    spiking loss stops the run before backward), clip, step, and count the step and its tokens in
    ``state``. Returns the gradient norm (None without clipping)."""
    t = recipe.train
    world = accelerator.num_processes
    grad_norm = None
    # The step's loss is the mean over its real targets on all processes, whatever the
    # micro-batch sizes: equal with and without grouping, and for k x b vs 1 x kb.
    local = torch.stack([targets_in(b, recipe.task) for b in group]).sum()
    denom = accelerator.reduce(local.double(), "sum").clamp(min=1)
    step_loss = 0.0
    for j, batch in enumerate(group):
        last = j == len(group) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():  # the LM head too runs outside forward
                s, n = loss_sums(model, batch, recipe.task)
            value, why = loss_trouble(
                accelerator, s / n.clamp(min=1), state.lowest_loss, t.max_loss_spike
            )
            if why:  # before backward: a NaN never reaches the weights
                at = state.micro_in_epoch + j
                rows = batches[at] if at < len(batches) else []
                raise stopped(why, state, recipe, rows, world, checkpointer.latest(), run_dir)
            if state.lowest_loss is None or value < state.lowest_loss:
                state.lowest_loss = value
            loss = s * (world / denom).to(s.dtype)  # DDP averages over processes
            accelerator.backward(loss)
        step_loss += loss.detach().float().item()
    if t.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        if not math.isfinite(float(grad_norm)) and accelerator.mixed_precision != "fp16":
            raise stopped(
                f"the gradient norm is {float(grad_norm)}",
                state,
                recipe,
                [],
                world,
                checkpointer.latest(),
                run_dir,
            )
    optimizer.step()
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.micro_in_epoch += len(group)
    real = sum(b.get("real_mask", b.get("attention_mask")).sum() for b in group)
    seen = sum(b["input_ids"].numel() for b in group)
    counts = accelerator.reduce(torch.stack([real, torch.tensor(seen).to(real)]), "sum")
    state.tokens += int(counts[0])
    state.processed_tokens += int(counts[1])
    window.tokens += int(counts[0])
    state.log_window = [state.log_window[0] + step_loss, state.log_window[1] + 1]
    state.global_step += 1
    return grad_norm


def log_step(
    *,
    accelerator,
    model,
    optimizer,
    state: LoopState,
    window: LogWindow,
    grad_norm,
    steps_per_epoch: int,
    t_start: float,
    metrics_path: Path,
    progress,
) -> tuple[float, LogWindow]:
    """The log row of the steps since the last one, to metrics.jsonl, the trackers and the progress
    bar; returns its loss and the window the next row counts from."""
    step = state.global_step
    row = log_row(
        accelerator,
        state,
        window,
        optimizer.param_groups[0]["lr"],
        grad_norm,
        steps_per_epoch,
        t_start,
    )
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if accelerator.is_main_process:
        append_jsonl(metrics_path, row)
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
    state.log_window = [0.0, 0]
    window = LogWindow(step=step)
    if progress:
        progress.update(step, loss=row["loss"], lr=row["lr"], tps=row["tokens_per_s"])
    return row["loss"], window


def finite_weights(
    model,
    *,
    state: LoopState,
    recipe: Recipe,
    world: int,
    checkpointer: Checkpointer,
    run_dir: Path,
) -> None:
    """Never write NaN/Inf weights: stop instead, keeping the last good checkpoint."""
    for n, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p.detach()).all():
            raise stopped(
                f"the weights are not finite after it ({n})",
                state,
                recipe,
                [],
                world,
                checkpointer.latest(),
                run_dir,
                applied=True,
            )


def checkpoint(
    *,
    checkpointer: Checkpointer,
    model,
    state: LoopState,
    recipe: Recipe,
    world: int,
    run_dir: Path,
    t_start: float,
) -> Path | None:
    """A checkpoint of the loop as it stands, once its weights are known to be finite."""
    finite_weights(
        model, state=state, recipe=recipe, world=world, checkpointer=checkpointer, run_dir=run_dir
    )
    return checkpointer.save(state.snapshot(time.perf_counter() - t_start))


def save_model(
    *,
    accelerator,
    model,
    adapted,
    recipe: Recipe,
    state: LoopState,
    checkpointer: Checkpointer,
    run_dir: Path,
) -> Path:
    """The trained adapter/ or model/ (finite weights only), with the tokenizer and ftcli's record;
    sharded runs gather the full state from every rank, the main process writes it."""
    initial = run_dir / INIT_ADAPTER
    initial = initial if (initial / "adapter_config.json").exists() else None
    out_dir = run_dir / ("model" if recipe.method.kind == "full" else "adapter")
    # sharded: every rank takes part in gathering the full state; the main process writes it
    full_state = accelerator.get_state_dict(model) if checkpointer.sharded else None
    finite_weights(
        model,
        state=state,
        recipe=recipe,
        world=accelerator.num_processes,
        checkpointer=checkpointer,
        run_dir=run_dir,
    )
    if accelerator.is_main_process:
        id2label = getattr(accelerator.unwrap_model(model).config, "id2label", None)
        labels = (
            [id2label[i] for i in range(len(id2label))] if recipe.task == "classification" else None
        )
        save_trained(
            accelerator,
            model,
            adapted.tokenizer,
            out_dir,
            model_record_for(recipe, adapted.model_dir, state.global_step, labels),
            full_state,
            initial,
        )
    accelerator.wait_for_everyone()
    return out_dir


# --------------------------------------------------------------------------- the loop


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
    model, pad = adapted.model, adapted.tokenizer.pad_token_id
    train_feats, val_feats = splits(tokenized, recipe=recipe)
    model = speed_up(recipe, model)
    optimizer = build_optimizer(recipe, model)
    schedule = unfreezing(recipe, model)  # gradual unfreezing: a pure function of the step
    world = accelerator.num_processes
    packed = recipe.data.packs(recipe.task, recipe.method.kind)
    stream = getattr(tokenized["train"], "stream", None)  # data.streaming (data/stream.py)
    if stream is not None:
        steps_per_epoch, total_steps = streamed_steps(t)
    else:
        lengths = lengths_of(train_feats)
        steps_per_epoch, total_steps = step_counts(
            t,
            micro_batches=len(epoch_batches(t, lengths=lengths, epoch=0, packed=packed)),
            world=world,
            progress=progress,
        )
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    left = pads_left(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    val_loader = None
    if val_feats:
        val_loader = accelerator.prepare(
            make_loader(
                val_feats,
                recipe.eval.batch_size,
                pad,
                collate_fn=collator(pad_id=pad, left=left),
            )
        )
    checkpointer = Checkpointer(
        run_dir / "checkpoints", accelerator, model, optimizer, scheduler, keep=t.keep_checkpoints
    )
    metrics_path = run_dir / "metrics.jsonl"
    main = accelerator.is_main_process
    state = start_state(checkpointer, resume=resume, metrics_path=metrics_path, main=main)
    resumed_from = state.global_step if resume else None

    eval_every = t.eval_every or steps_per_epoch
    ckpt_every = t.checkpoint_every or steps_per_epoch
    window = LogWindow(step=state.global_step)
    t_start = time.perf_counter() - state.seconds
    skip = state.micro_in_epoch
    last_loss = grad_norm = pruned_at = None
    varlen = varlen_attention(accelerator.unwrap_model(model))
    collate_fn = collator(pad_id=pad, left=left, packed=packed, varlen=varlen)

    model.train()
    if progress:
        progress.start(total_steps, state.global_step)
    try:
        while state.global_step < total_steps and state.stopped_at is None and pruned_at is None:
            if stream is not None:  # endless; --resume reads and skips the batches it trained
                batches = []
                loader = stream.loader(accelerator, collate_fn, skip)
            else:
                batches = epoch_batches(t, lengths=lengths, epoch=state.epoch, packed=packed)
                loader = accelerator.prepare(
                    make_loader(
                        train_feats, t.batch_size, pad, batches=batches, collate_fn=collate_fn
                    )
                )
                if skip:
                    loader = accelerator.skip_first_batches(loader, skip)
            state.micro_in_epoch, skip = skip, 0
            for group in optimizer_steps(loader, t.gradient_accumulation):
                if schedule is not None:
                    schedule.apply(model, state.global_step)
                grad_norm = train_step(
                    group,
                    accelerator=accelerator,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    state=state,
                    window=window,
                    recipe=recipe,
                    batches=batches,
                    checkpointer=checkpointer,
                    run_dir=run_dir,
                )
                step = state.global_step
                if step % t.log_every == 0 or step == total_steps:
                    last_loss, window = log_step(
                        accelerator=accelerator,
                        model=model,
                        optimizer=optimizer,
                        state=state,
                        window=window,
                        grad_norm=grad_norm,
                        steps_per_epoch=steps_per_epoch,
                        t_start=t_start,
                        metrics_path=metrics_path,
                        progress=progress,
                    )
                    if PAUSE:
                        pause(f"step:{step}")
                elif progress:
                    progress.update(step)
                if val_loader is not None and (step % eval_every == 0 or step == total_steps):
                    t_eval = time.perf_counter()
                    v = evaluate_loss(accelerator, model, val_loader, recipe.task)
                    window.t0 += time.perf_counter() - t_eval  # tokens/s counts training time only
                    pruned_at = after_validation(
                        v,
                        step=step,
                        total_steps=total_steps,
                        steps_per_epoch=steps_per_epoch,
                        state=state,
                        recipe=recipe,
                        accelerator=accelerator,
                        model=model,
                        scheduler=scheduler,
                        checkpointer=checkpointer,
                        metrics_path=metrics_path,
                        progress=progress,
                        pruning=pruning,
                        val_feats=val_feats,
                        pad_id=pad,
                    )
                    if pruned_at is not None:
                        break
                if step % ckpt_every == 0 and step < total_steps and state.stopped_at is None:
                    checkpoint(
                        checkpointer=checkpointer,
                        model=model,
                        state=state,
                        recipe=recipe,
                        world=world,
                        run_dir=run_dir,
                        t_start=t_start,
                    )
                if step >= total_steps or state.stopped_at is not None:
                    break
            else:  # the epoch ran out before total_steps
                state.epoch += 1
                state.micro_in_epoch = 0
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        path = checkpoint(
            checkpointer=checkpointer,
            model=model,
            state=state,
            recipe=recipe,
            world=world,
            run_dir=run_dir,
            t_start=t_start,
        )
        raise Interrupted(state.global_step, path) from None
    if progress:
        progress.stop()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t_start
    best_step = None
    if t.early_stopping:  # evaluation and merge see the best weights, not the last
        best_step = checkpointer.restore_best()
    if schedule is not None:  # the saved model's trainable flags as the full schedule leaves them
        schedule.apply(model, total_steps)
    out_dir = save_model(
        accelerator=accelerator,
        model=model,
        adapted=adapted,
        recipe=recipe,
        state=state,
        checkpointer=checkpointer,
        run_dir=run_dir,
    )
    return Trained(
        output_dir=out_dir,
        steps=state.global_step,
        epochs=state.global_step / steps_per_epoch,
        last_train_loss=last_loss,
        best_val_loss=state.best_val_loss,
        best_val_step=state.best_val_step,
        seconds=seconds,
        tokens=state.tokens,
        resumed_from=resumed_from,
        mixed_precision=accelerator.mixed_precision,
        stopped_at=state.stopped_at,
        best_step=best_step,
        pruned_at=pruned_at,
        processed_tokens=state.processed_tokens,
        packed=packed,
    )
