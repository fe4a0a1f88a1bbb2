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
from functools import partial
from pathlib import Path

import torch

from ftcli.adapt import INIT_ADAPTER
from ftcli.data.rows import lengths_of
from ftcli.data.stream import steps as streamed_steps
from ftcli.data.tokenize import Tokenized
from ftcli.distributed import configure_deepspeed, place, uses_deepspeed
from ftcli.errors import FtcliError, Interrupted, TrainingStopped
from ftcli.forward import loss_sums
from ftcli.models import pads_left
from ftcli.recipe import Recipe, TrainSpec
from ftcli.rundir import model_record_for
from ftcli.strategies import unfreezing
from ftcli.testpoints import PAUSE, pause
from ftcli.train.batching import (
    FLEX,
    choose_packing,
    collator,
    compute_dtype,
    epoch_batches,
    make_loader,
    optimizer_steps,
    targets_in,
)
from ftcli.train.checkpoints import Checkpointer, save_trained
from ftcli.train.objectives import (
    PAIR_TASKS,
    STATS,
    pair_collator,
    pair_lengths,
    pair_objective,
    pairs_in,
    stats_row,
)
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


def loss_trouble(accelerator, loss, lowest, spike: float | None):
    """On the device, no host sync: (the micro-batch loss, the worst over processes; a 0-d bool,
    true when training must stop: a NaN/Inf loss, or one over ``spike`` times ``lowest``, the
    lowest so far, +inf when none). ``Tally.settle`` reads the verdict once per window."""
    v = loss.detach().float().reshape(())
    if accelerator.num_processes > 1:  # every process stops together, or none does
        v = accelerator.reduce(torch.nan_to_num(v, nan=float("inf")), "max")
    bad = ~torch.isfinite(v)
    if spike:  # nan and inf compare false: no spike while nothing is known
        bad = bad | ((lowest > 0) & (v > spike * lowest))
    return v, bad


LOSS, SPIKE, GRAD = 1, 2, 3  # Tally.trouble's codes


class Tally:
    """What the steps since the last read left on the device: the window's summed loss, the real
    and processed tokens, the lowest micro-batch loss, the last gradient norm and the first
    trouble (code, micro-batch, value, the lowest loss then). ``settle`` reads them all in one
    host sync; the loop calls it at each log row, validation, checkpoint and at the end, so a NaN
    or a spike is caught at most ``log_every`` steps late, and never after a checkpoint that
    would keep it (docs/run-folder.md)."""

    def __init__(self, device, lowest: float | None, spike: float | None):
        self.spike = spike
        z = partial(torch.zeros, dtype=torch.float64, device=device)
        self.loss, self.counts, self.trouble = z(()), z(2), z(4)
        self.pairs = z(len(STATS))  # preference/reward: the pair statistics (objectives.STATS)
        self.lowest = torch.tensor(
            math.inf if lowest is None else lowest, dtype=torch.float64, device=device
        )
        self.grad_norm = None
        self.micro: list[tuple[int, list[int]]] = []  # (its step, its rows) of each micro-batch

    def flag(self, bad, code, value) -> None:
        """Keep the first trouble: ``bad`` (0-d bool) at the latest micro-batch, as ``code``."""
        # torch.full: a fill on the device; torch.tensor(x, device=cuda) would copy and synchronise
        at = torch.full_like(self.lowest, len(self.micro) - 1)
        code = code.to(at) if torch.is_tensor(code) else torch.full_like(at, code)
        rec = torch.stack([code, at, value.to(at), self.lowest])
        self.trouble = torch.where(bad & (self.trouble[0] == 0), rec, self.trouble)

    def settle(self, accelerator, state: LoopState, window: LogWindow):
        """One host sync: the tallies into ``state`` and ``window``; returns (why, step, rows) of
        the first trouble since the last settle, else None."""
        sums = torch.cat([self.loss.reshape(1), self.counts, self.pairs])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, "sum") / torch.tensor(
                [accelerator.num_processes] + [1] * (2 + len(STATS)),
                dtype=sums.dtype,
                device=sums.device,
            )
        norm = (
            self.grad_norm if self.grad_norm is not None else torch.full_like(self.loss, math.nan)
        )
        loss, real, seen, *pairs, lowest, code, at, value, before, grad_norm = torch.cat(
            [sums, self.lowest.reshape(1), self.trouble, norm.reshape(1).to(sums)]
        ).tolist()
        state.log_pairs = [a + b for a, b in zip(state.log_pairs, pairs, strict=True)]
        state.log_window = [state.log_window[0] + loss, state.log_window[1]]
        state.tokens += int(real)
        state.processed_tokens += int(seen)
        window.tokens += int(real)
        state.lowest_loss = None if math.isinf(lowest) else lowest
        window.grad_norm = None if self.grad_norm is None else grad_norm
        micro, self.micro = self.micro, []
        self.loss, self.counts = torch.zeros_like(self.loss), torch.zeros_like(self.counts)
        self.pairs = torch.zeros_like(self.pairs)
        if not code:
            return None
        step, rows = micro[int(at)]
        if code == GRAD:
            return f"the gradient norm is {value}", step, []
        if code == LOSS:
            return f"the loss is {value}", step, rows
        return (
            f"the loss {value:.4g} is over train.max_loss_spike ({self.spike:g}) times the lowest "
            f"so far ({before:.4g})",
            step,
            rows,
        )


def stopped(
    why: str,
    state,
    recipe: Recipe,
    rows: list[int],
    world: int,
    last_ckpt,
    run_dir: Path,
    step: int | None = None,
) -> TrainingStopped:
    """One message: the step (``step``: found at a later settle, its updates were applied but
    never saved), the likely causes (with the rows of the batch), what was kept."""
    t = recipe.train
    where = ""
    if world == 1 and rows:
        idx = sorted(i + 1 for i in rows)
        where = f" (lines {', '.join(map(str, idx[:8]))}{'...' if len(idx) > 8 else ''} of "
        where += f"{run_dir / 'data' / 'train.jsonl'})"
    kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved"
    nothing = "nothing from it on was saved" if step else "nothing was saved"
    step = step or state.global_step
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
    # preference/reward: the pair statistics since the last log (objectives.STATS sums)
    log_pairs: list = field(default_factory=lambda: [0.0] * len(STATS))

    def snapshot(self, seconds: float) -> dict:
        return {**asdict(self), "seconds": seconds}


@dataclass
class LogWindow:
    """Throughput since the last log row (training time only: validation is subtracted)."""

    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    step: int = 0
    grad_norm: float | None = None  # the last step's, as Tally.settle read it


def log_row(
    state: LoopState,
    window: LogWindow,
    lr: float,
    grad_norm: float | None,
    steps_per_epoch: int,
    t_start: float,
    task: str = "causal_lm",
) -> dict:
    """One metrics.jsonl row: the loss averaged over the window's steps (each already the mean over
    its real targets on all processes, as ``Tally.settle`` summed them; a float32 value, as it has
    always been logged); tokens/s counts real tokens. No device access."""
    loss_sum, micro = state.log_window
    mean = torch.tensor(loss_sum / micro).item()  # a CPU tensor: the float32 rounding, no sync
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
        row["grad_norm"] = grad_norm
    if task in PAIR_TASKS:  # reward accuracy and margin, chosen/rejected log-probs, KL on chosen
        row.update(stats_row(state.log_pairs, task))
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
    tally: Tally,
    recipe: Recipe,
    rows: list[list[int]],
    objective=None,
) -> None:
    """One optimizer step over the micro-batches of ``group`` (``rows``: their examples): forward
    and backward each, clip, step, and count the step in ``state`` and its loss, tokens and
    troubles in ``tally``, on the device: no host sync (``Tally.settle`` reads them).

    Under DeepSpeed the engine steps at the group's last backward (told by ``sync_gradients``;
    its config carries the accumulation and the clipping: ftcli.distributed.configure_deepspeed),
    and its backward divides by the configured accumulation, which the loss is multiplied back by.
    ``objective`` (task preference/reward): the pair loss, averaged over the step's pairs.
    """
    t = recipe.train
    world = accelerator.num_processes
    deepspeed = uses_deepspeed(accelerator)
    # The step's loss is the mean over its real targets on all processes, whatever the
    # micro-batch sizes: equal with and without grouping, and for k x b vs 1 x kb.
    count = pairs_in if objective is not None else partial(targets_in, task=recipe.task)
    local = torch.stack([count(b) for b in group]).sum()
    denom = accelerator.reduce(local.double(), "sum").clamp(min=1)
    for j, batch in enumerate(group):
        last = j == len(group) - 1
        tally.micro.append((state.global_step + 1, rows[j] if j < len(rows) else []))
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():  # the LM head too runs outside forward
                if objective is not None:  # preference / reward: chosen and rejected, one forward
                    s, n, pair_stats = objective.sums(model, batch)
                    tally.pairs += pair_stats
                else:
                    s, n = loss_sums(model, batch, recipe.task)
            value, bad = loss_trouble(
                accelerator, s / n.clamp(min=1), tally.lowest, t.max_loss_spike
            )
            tally.flag(bad, torch.where(torch.isfinite(value), SPIKE, LOSS), value)
            tally.lowest = torch.fmin(tally.lowest, value.double())
            loss = s * (world / denom).to(s.dtype)  # DDP averages over processes
            if deepspeed:
                accelerator.sync_gradients = last
            accelerator.backward(loss * t.gradient_accumulation if deepspeed else loss)
        tally.loss += loss.detach().float().double()
    if deepspeed:
        accelerator.sync_gradients = True
    elif t.max_grad_norm:  # DeepSpeed's engine clips at its step, to the same train.max_grad_norm
        tally.grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        if accelerator.mixed_precision != "fp16":  # fp16: the scaler skips an overflowing step
            tally.flag(~torch.isfinite(tally.grad_norm), GRAD, tally.grad_norm)
    optimizer.step()
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step()  # once per optimizer step, DeepSpeed's too
    optimizer.zero_grad(set_to_none=True)
    state.micro_in_epoch += len(group)
    real = sum(b.get("real_mask", b.get("attention_mask")).sum() for b in group)
    seen = sum(b["input_ids"].numel() for b in group)
    tally.counts += torch.stack([real.double(), torch.full_like(tally.loss, seen)])
    state.log_window = [state.log_window[0], state.log_window[1] + 1]
    state.global_step += 1


def log_step(
    *,
    accelerator,
    model,
    optimizer,
    state: LoopState,
    window: LogWindow,
    steps_per_epoch: int,
    t_start: float,
    metrics_path: Path,
    progress,
    task: str = "causal_lm",
) -> tuple[float, LogWindow]:
    """The log row of the steps since the last one, to metrics.jsonl, the trackers and the progress
    bar; returns its loss and the window the next row counts from."""
    step = state.global_step
    grad_norm = window.grad_norm
    if uses_deepspeed(accelerator) and accelerator.deepspeed_engine_wrapped is not None:
        grad_norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()  # its last step's
    row = log_row(
        state,
        window,
        optimizer.param_groups[0]["lr"],
        grad_norm,
        steps_per_epoch,
        t_start,
        task,
    )
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if accelerator.is_main_process:
        append_jsonl(metrics_path, row)
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
    state.log_window = [0.0, 0]
    state.log_pairs = [0.0] * len(STATS)
    window = LogWindow(step=step)
    if progress:
        progress.update(step, loss=row["loss"], lr=row["lr"], tps=row["tokens_per_s"])
    return row["loss"], window


def settle(tally: Tally, accelerator, state, window, recipe, checkpointer, run_dir) -> None:
    """The tallies read (one host sync); the first trouble since the last read stops the run: its
    updates were applied but nothing from it on is saved, the last checkpoint is the good one."""
    found = tally.settle(accelerator, state, window)
    if found:
        why, step, rows = found
        world, latest = accelerator.num_processes, checkpointer.latest()
        raise stopped(why, state, recipe, rows, world, latest, run_dir, step=step)


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
    load_reference=None,
) -> Trained:
    """Train ``adapted.model`` on ``tokenized['train']``; validate on ``tokenized['validation']``.

    With ``pruning``, each validation is reported to the study's trial, and the run stops early
    (saved as it stands) when the pruner says the trial is weak. Task preference/reward trains
    on pairs (train/objectives.py); ``load_reference()`` loads a frozen reference model when the
    recipe's needs one."""
    t = recipe.train
    model, pad = adapted.model, adapted.tokenizer.pad_token_id
    train_feats, val_feats = splits(tokenized, recipe=recipe)
    model = place(speed_up(recipe, model), accelerator)  # on its device before the optimizer
    objective = None
    if recipe.task in PAIR_TASKS:  # pairs; the reference, scored once if precompute_reference
        with accelerator.main_process_first():  # the main process fills the cache, then the rest
            objective, found = pair_objective(
                recipe,
                model,
                load_reference,
                {"train": train_feats, "validation": val_feats},
                model_dir=adapted.model_dir,
                pad_id=pad,
                device=accelerator.device,
                autocast=accelerator.autocast,
                note=progress.note if progress and accelerator.is_main_process else None,
            )
        train_feats, val_feats = found["train"], found["validation"]
    optimizer = build_optimizer(recipe, model, device=accelerator.device)
    schedule = unfreezing(recipe, model)  # gradual unfreezing: a pure function of the step
    world = accelerator.num_processes
    packed = recipe.data.packs(recipe.task, recipe.method.kind)  # never for pair tasks
    stream = getattr(tokenized["train"], "stream", None)  # data.streaming (data/stream.py)
    if stream is not None:
        steps_per_epoch, total_steps = streamed_steps(t)
    else:
        lengths = pair_lengths(train_feats) if objective else lengths_of(train_feats)
        steps_per_epoch, total_steps = step_counts(
            t,
            micro_batches=len(epoch_batches(t, lengths=lengths, epoch=0, packed=packed)),
            world=world,
            progress=progress,
        )
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    left = pads_left(model)
    configure_deepspeed(accelerator, t)  # micro-batch, accumulation and clipping from the recipe
    model, optimizer = accelerator.prepare(model, optimizer)
    val_loader = None
    if val_feats:
        val_collate = collator(pad_id=pad, left=left)
        if objective is not None:
            val_collate = pair_collator(pad, recipe.preference.loss == "kto")
        val_loader = accelerator.prepare(
            make_loader(val_feats, recipe.eval.batch_size, pad, collate_fn=val_collate)
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
    last_loss = pruned_at = None
    tally = Tally(accelerator.device, state.lowest_loss, t.max_loss_spike)
    inner = accelerator.unwrap_model(model)
    packing = choose_packing(inner, accelerator.device) if packed else None
    attention = (getattr(inner.config, "_attn_implementation", None), inner.config.use_cache)
    if packing == FLEX:  # flex reads the packing from the position ids only without a cache
        inner.set_attn_implementation("flex_attention")
        inner.config.use_cache = False
    dtype = compute_dtype(inner, accelerator.mixed_precision)
    collate_fn = collator(pad_id=pad, left=left, packed=packed, path=packing, dtype=dtype)
    if objective is not None:
        collate_fn = pair_collator(
            pad, recipe.task == "preference" and recipe.preference.loss == "kto"
        )

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
                at = state.micro_in_epoch
                train_step(
                    group,
                    accelerator=accelerator,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    state=state,
                    tally=tally,
                    recipe=recipe,
                    rows=batches[at : at + len(group)],
                    objective=objective,
                )
                step = state.global_step
                log_due = step % t.log_every == 0 or step == total_steps
                val_due = val_loader is not None and (step % eval_every == 0 or step == total_steps)
                if log_due or val_due or step % ckpt_every == 0:  # one host sync, at most
                    settle(tally, accelerator, state, window, recipe, checkpointer, run_dir)
                if log_due:
                    last_loss, window = log_step(
                        accelerator=accelerator,
                        model=model,
                        optimizer=optimizer,
                        state=state,
                        window=window,
                        steps_per_epoch=steps_per_epoch,
                        t_start=t_start,
                        metrics_path=metrics_path,
                        progress=progress,
                        task=recipe.task,
                    )
                    if PAUSE:
                        pause(f"step:{step}")
                elif progress:
                    progress.update(step)
                if val_due:
                    t_eval = time.perf_counter()
                    v = evaluate_loss(accelerator, model, val_loader, recipe.task, objective)
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
        settle(tally, accelerator, state, window, recipe, checkpointer, run_dir)
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
    if packing == FLEX and attention[0]:  # the saved config keeps its attention and cache
        inner.set_attn_implementation(attention[0])
        inner.config.use_cache = attention[1]
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
