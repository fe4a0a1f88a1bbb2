"""train(): one explicit training loop over ``accelerate.Accelerator``.

Optimizers (torch AdamW/Adam/SGD/RMSprop, bitsandbytes 8-bit and paged AdamW), warmup + constant /
linear / cosine schedules or reduce-on-plateau, gradient accumulation and clipping, mixed precision,
validation loss every N steps, ``metrics.jsonl``, checkpoints that ``--resume`` continues exactly,
and Ctrl-C that saves one. The same function runs under ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ftcli.adapt import INIT_ADAPTER
from ftcli.data.tokenize import IGNORE_INDEX, Tokenized, collate, pack, padded_width
from ftcli.distributed import is_sharded
from ftcli.errors import FtcliError, Interrupted, TrainingStopped
from ftcli.forward import loss_sums
from ftcli.models import pads_left
from ftcli.recipe import Recipe
from ftcli.rundir import model_record_for, write_model_record
from ftcli.strategies import learning_rate, num_blocks, param_groups, unfreezing
from ftcli.util import (
    append_jsonl,
    atomic_dir,
    check_hashes,
    file_hashes,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)


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


# --------------------------------------------------------------------------- building blocks


def make_loader(
    features: list[dict],
    batch_size: int,
    pad_id: int,
    order: list[int] | None = None,
    batches: list[list[int]] | None = None,
    collate_fn=None,
):
    """A loader over ``features``: in ``order`` by ``batch_size``, or exactly the index ``batches``."""
    data = [features[i] for i in order] if order is not None else features
    by = {"batch_sampler": batches} if batches is not None else {"batch_size": batch_size}
    # An explicit generator: starting an iterator must not draw from the global RNG, or a resumed
    # run's dropout masks would drift from the uninterrupted run's.
    return DataLoader(
        data,
        shuffle=False,
        collate_fn=collate_fn or (lambda b: collate(b, pad_id)),
        generator=torch.Generator().manual_seed(0),
        pin_memory=torch.cuda.is_available(),
        **by,
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


MEGA_BATCHES = 50  # length grouping sorts within windows of this many batches


def batch_plan(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group: bool = True,
    batch_tokens: int | None = None,
    packed: bool = False,
) -> list[list[int]]:
    """The micro-batches (example indices) of epoch ``epoch``, a pure function of its arguments so
    ``--resume`` replays them exactly. Every example appears once per epoch.

    ``group``: the epoch's shuffled order cut into windows of ~50 batches, each sorted by length
    (long first) and cut into batches, then the batch order shuffled with the heaviest batch first:
    batches of similar lengths, little padding. ``batch_tokens``: a micro-batch takes examples
    while the tokens the model runs on (packed: their sum; padded: count x longest, rounded up to
    PAD_MULTIPLE) stay within the budget.
    """
    order = epoch_order(len(lengths), seed, epoch)
    if not group and batch_tokens is None:
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    window = batch_size * MEGA_BATCHES
    if batch_tokens is not None:
        window = max(window, MEGA_BATCHES * batch_tokens // max(1, max(lengths)))
    batches: list[list[int]] = []
    for s in range(0, len(order), window):
        part = order[s : s + window]
        if group:
            part = sorted(part, key=lambda i: -lengths[i])
        if batch_tokens is None:
            batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
            continue
        cur: list[int] = []
        longest = used = 0
        for i in part:
            k = lengths[i]
            cost = used + k if packed else (len(cur) + 1) * padded_width(max(longest, k))
            if cur and cost > batch_tokens:
                batches.append(cur)
                cur, longest, used = [], 0, 0
            cur.append(i)
            longest, used = max(longest, k), used + k
        if cur:
            batches.append(cur)
    if group:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        # the heaviest batch first: the allocator's largest blocks are taken at step 1 and reused,
        # instead of a late long batch growing a heap that smaller shapes have fragmented (peak
        # RSS on CPU, reserved memory on CUDA), and an out-of-memory shows at step 1, not hours in
        heaviest = max(range(len(batches)), key=lambda b: batch_cost(batches[b], lengths, packed))
        batches.insert(0, batches.pop(heaviest))
    return batches


def batch_cost(rows: list[int], lengths: list[int], packed: bool) -> int:
    """The tokens the model runs on for a micro-batch: their sum packed, count x padded longest."""
    if packed:
        return sum(lengths[i] for i in rows)
    return len(rows) * padded_width(max(lengths[i] for i in rows))


def targets_in(batch: dict, task: str):
    """What the loss averages over in a micro-batch: examples, or supervised next-token positions."""
    labels = batch["labels"]
    if task == "classification":
        return torch.tensor(labels.shape[0], device=labels.device)
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def optimizer_steps(loader, k: int):
    """The loader's micro-batches in groups of ``k`` (the last may be shorter): one optimizer step each."""
    group: list = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def build_optimizer(recipe: Recipe, model):
    """The optimizer over every trainable parameter, in groups with their own lr (weight decay on
    matrices only; LoRA+ and layer_decay: ftcli.strategies.param_groups)."""
    o = recipe.train.optimizer
    if not any(p.requires_grad for p in model.parameters()):
        raise FtcliError(
            "the model has no trainable parameters",
            hint="check method.kind and method.target_modules",
        )
    config = getattr(model, "config", None)
    groups = param_groups(recipe, model, num_blocks(config) if config is not None else None)
    lr, _ = learning_rate(recipe)
    name = o.name
    if name in ("adamw8bit", "paged_adamw", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = {
            "adamw8bit": bnb.optim.AdamW8bit,
            "paged_adamw": bnb.optim.PagedAdamW,
            "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        }[name]
        return cls(groups, lr=lr, betas=o.betas, eps=o.eps)
    if name == "adamw":  # fused: one kernel for all parameters on CUDA
        fused = next(model.parameters()).is_cuda or None
        return torch.optim.AdamW(groups, lr=lr, betas=o.betas, eps=o.eps, fused=fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=o.betas, eps=o.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=o.momentum, eps=o.eps)
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
            with accelerator.autocast():
                s, c = loss_sums(model, batch, task)
            total += s.double()
            count += c.double()
    total = accelerator.reduce(total, "sum")
    count = accelerator.reduce(count, "sum")
    if was_training:
        model.train()
    return (total / count).item() if count.item() else float("nan")


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


# --------------------------------------------------------------------------- checkpoints


def trainable_state(model, optimizer=None) -> dict:
    """The weights training changes: those the optimizer holds (under gradual unfreezing some are
    frozen for now), else those that require grad."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer else None
    return {
        n: p.detach().cpu().contiguous().clone()
        for n, p in model.named_parameters()
        if (id(p) in held if held is not None else p.requires_grad)
    }


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Trainable weights (safetensors), optimizer, scheduler and RNG states, and the loop position."""
    target = ckpt_root / f"step-{state['global_step']:07d}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model, optimizer), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        # state.json is the checkpoint's record, written last: the sha256 of every file beside it
        write_json(tmp / "state.json", {**state, "sha256": file_hashes(tmp)})
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


BEST = "best"  # checkpoints/best: early stopping's best weights so far


def save_best(ckpt_root: Path, model, optimizer, step: int, val_loss: float) -> None:
    """Early stopping keeps the best weights on disk, so --resume keeps them too."""
    with atomic_dir(ckpt_root / BEST) as tmp:
        save_file(trainable_state(model, optimizer), str(tmp / "trainable.safetensors"))
        write_json(tmp / "best.json", {"step": step, "val_loss": val_loss})


def restore_best(ckpt_root: Path, model) -> int | None:
    """Put the best weights back; returns their step (None if there is no best checkpoint)."""
    folder = ckpt_root / BEST
    if not (folder / "best.json").exists():
        return None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(folder / "trainable.safetensors")).items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return int(read_json(folder / "best.json")["step"])


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    state = read_json(ckpt / "state.json")
    check_hashes(ckpt, state.pop("sha256", {}), "checkpoint")
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
    return state


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
    from ftcli.evaluation.metrics import classification_summary
    from ftcli.forward import class_probabilities

    probs = class_probabilities(model, features, pad_id, batch_size, device)
    model.train()
    names = [str(i) for i in range(len(probs[0]))]
    return classification_summary([f["labels"] for f in features], probs, names)[p.metric]


def save_sharded_checkpoint(accelerator, ckpt_root: Path, scheduler, state: dict, keep: int):
    """FSDP / DeepSpeed: every rank writes its shards with ``accelerator.save_state`` (model,
    optimizer, RNG); ``--resume`` restores them under the same world size."""
    target = ckpt_root / f"step-{state['global_step']:07d}"
    tmp = ckpt_root / f".partial-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "state.json", state)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def save_trained(
    accelerator, model, tokenizer, out_dir: Path, record, state_dict=None, initial=None
) -> None:
    """The final adapter (peft) or full model, plus the tokenizer and ftcli's record of both.
    ``state_dict``: the full state gathered from the shards (FSDP / DeepSpeed). ``initial``: a
    PiSSA/OLoRA run's starting adapter; the saved one is converted by peft to a plain LoRA delta
    on the original base (rank 2r), so merge and predict need no rewritten base."""
    unwrapped = accelerator.unwrap_model(model)
    kwargs = {"path_initial_model_for_weight_conversion": str(initial)} if initial else {}
    with atomic_dir(out_dir) as tmp:
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        unwrapped.save_pretrained(tmp, safe_serialization=True, **kwargs)
        if initial:
            _keep_saved_modules(unwrapped, tmp)
        tokenizer.save_pretrained(tmp)
        write_model_record(
            tmp, record.model_copy(update={"sha256": file_hashes(tmp, "*.safetensors")})
        )


def _keep_saved_modules(peft_model, folder: Path) -> None:
    """peft 0.21's PiSSA/OLoRA conversion keeps only the LoRA tensors and drops modules_to_save
    (the task head): put them back, or the adapter would not load."""
    from peft import get_peft_model_state_dict

    path = folder / "adapter_model.safetensors"
    saved = load_file(str(path))
    plain = get_peft_model_state_dict(peft_model)
    missing = {k: v.detach().cpu().contiguous() for k, v in plain.items() if "lora_" not in k}
    missing = {k: v for k, v in missing.items() if k not in saved}
    if missing:
        save_file({**saved, **missing}, str(path), metadata={"format": "pt"})


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

    model = speed_up(recipe, model)
    optimizer = build_optimizer(recipe, model)
    schedule = unfreezing(recipe, model)  # gradual unfreezing: a pure function of the step
    early = t.early_stopping
    world = accelerator.num_processes
    packed = recipe.data.packs(recipe.task, recipe.method.kind)
    lengths = [len(f["input_ids"]) for f in train_feats]

    def plan(epoch: int) -> list[list[int]]:
        return batch_plan(
            lengths, t.batch_size, t.seed, epoch, t.group_by_length, t.batch_tokens, packed
        )

    micro_per_epoch = math.ceil(len(plan(0)) / world)
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
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    left = pads_left(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    val_loader = None
    if val_feats:
        val_loader = accelerator.prepare(
            make_loader(
                val_feats,
                recipe.eval.batch_size,
                tok.pad_token_id,
                collate_fn=lambda b: collate(b, tok.pad_token_id, left),
            )
        )
    main = accelerator.is_main_process
    sharded = is_sharded(accelerator)

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
        if sharded:
            accelerator.load_state(str(ckpt))
            scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
            saved = read_json(ckpt / "state.json")
        else:
            saved = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        state = LoopState(**{k: v for k, v in saved.items() if k in LoopState.__dataclass_fields__})
        resumed_from = state.global_step
        if main:  # drop metrics logged after the checkpoint
            write_jsonl(
                metrics_path,
                [
                    r
                    for r in read_jsonl(metrics_path, partial_tail=True)
                    if r.get("step", 0) <= resumed_from
                ],
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

    def finite_weights() -> None:
        """Never write NaN/Inf weights: stop instead, keeping the last good checkpoint."""
        for n, p in model.named_parameters():
            if p.requires_grad and not torch.isfinite(p.detach()).all():
                raise stopped(
                    f"the weights are not finite after it ({n})",
                    state,
                    recipe,
                    [],
                    world,
                    latest_checkpoint(ckpt_root),
                    run_dir,
                    applied=True,
                )

    def checkpoint() -> Path | None:
        finite_weights()
        path = None
        if sharded:
            snap = state.snapshot(time.perf_counter() - t_start)
            return save_sharded_checkpoint(
                accelerator, ckpt_root, scheduler, snap, t.keep_checkpoints
            )
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

    batches: list[list[int]] = []  # this epoch's plan: the rows a stopped step names
    pad = tok.pad_token_id
    varlen = str(getattr(accelerator.unwrap_model(model).config, "_attn_implementation", ""))
    varlen = varlen.startswith("flash_attention")  # varlen kernels isolate packed examples

    def fn(b):
        return pack(b, pad, None, varlen) if packed else collate(b, pad, left)

    model.train()
    if progress:
        progress.start(total_steps, state.global_step)
    try:
        while state.global_step < total_steps and state.stopped_at is None and pruned_at is None:
            batches = plan(state.epoch)
            loader = accelerator.prepare(
                make_loader(train_feats, t.batch_size, pad, batches=batches, collate_fn=fn)
            )
            if skip:
                loader = accelerator.skip_first_batches(loader, skip)
            state.micro_in_epoch, skip = skip, 0
            for group in optimizer_steps(loader, t.gradient_accumulation):
                if schedule is not None:
                    schedule.apply(model, state.global_step)
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
                            raise stopped(
                                why,
                                state,
                                recipe,
                                rows,
                                world,
                                latest_checkpoint(ckpt_root),
                                run_dir,
                            )
                        if state.lowest_loss is None or value < state.lowest_loss:
                            state.lowest_loss = value
                        loss = s * (world / denom).to(s.dtype)  # DDP averages over processes
                        accelerator.backward(loss)
                    step_loss += loss.detach().float().item()
                if t.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    if (
                        not math.isfinite(float(grad_norm))
                        and accelerator.mixed_precision != "fp16"
                    ):
                        raise stopped(
                            f"the gradient norm is {float(grad_norm)}",
                            state,
                            recipe,
                            [],
                            world,
                            latest_checkpoint(ckpt_root),
                            run_dir,
                        )
                optimizer.step()
                if not plateau:
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
                    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                    if main:
                        append_jsonl(metrics_path, row)
                    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
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
                    margin = early.min_delta if early else 0.0
                    if state.best_val_loss is None or v < state.best_val_loss - margin:
                        state.best_val_loss, state.best_val_step = v, step
                        state.bad_validations = 0
                        if early and main:
                            save_best(
                                ckpt_root, accelerator.unwrap_model(model), optimizer, step, v
                            )
                    elif early:
                        state.bad_validations += 1
                        if state.bad_validations >= early.patience:
                            state.stopped_at = step
                    if plateau:
                        scheduler.step(v)
                    accelerator.log({"val_loss": v}, step=step)
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
                if step % ckpt_every == 0 and step < total_steps and state.stopped_at is None:
                    checkpoint()
                if step >= total_steps or state.stopped_at is not None:
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
    best_step = None
    if early:  # evaluation and merge see the best weights, not the last
        best_step = restore_best(ckpt_root, accelerator.unwrap_model(model))
    if schedule is not None:  # the saved model's trainable flags as the full schedule leaves them
        schedule.apply(model, total_steps)
    initial = run_dir / INIT_ADAPTER
    initial = initial if (initial / "adapter_config.json").exists() else None
    out_dir = run_dir / ("model" if recipe.method.kind == "full" else "adapter")
    # sharded: every rank takes part in gathering the full state; the main process writes it
    full_state = accelerator.get_state_dict(model) if sharded else None
    finite_weights()
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
            full_state,
            initial,
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
        state.stopped_at,
        best_step,
        pruned_at,
        state.processed_tokens,
        packed,
    )
