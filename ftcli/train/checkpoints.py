"""A run's checkpoints/ folder: step-N checkpoints (the last ``keep``) that ``--resume`` continues
exactly, sharded ones under FSDP / DeepSpeed, early stopping's best weights, and the final save.
Every file a checkpoint holds is hashed in its state.json and checked before it is resumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftcli.distributed import is_sharded
from ftcli.errors import FtcliError
from ftcli.rundir import write_model_record
from ftcli.testpoints import PAUSE, pause
from ftcli.util import (
    atomic_dir,
    check_hashes,
    file_hashes,
    read_json,
    seal_dir,
    shards_dir,
    write_json,
)


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
        if PAUSE:
            pause("checkpoint")
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


def save_sharded_checkpoint(accelerator, ckpt_root: Path, scheduler, state: dict, keep: int):
    """FSDP / DeepSpeed: every rank writes its shards with ``accelerator.save_state`` (model,
    optimizer, RNG); ``--resume`` restores them under the same world size."""
    target = ckpt_root / f"step-{state['global_step']:07d}"
    tmp = shards_dir(target)  # every rank writes here; sealed (hashed, swapped in) by the main one
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        seal_dir(
            tmp,
            target,
            "state.json",
            state,
            write=lambda d: torch.save(scheduler.state_dict(), d / "scheduler.pt"),
        )
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


class Checkpointer:
    """The checkpoints of one training run under ``root``, for its (prepared) model, optimizer and
    scheduler: the main process writes the trainable weights, or every rank its shards (sharded)."""

    def __init__(self, root: Path, accelerator, model, optimizer, scheduler, *, keep: int):
        self.root, self.accelerator, self.keep = root, accelerator, keep
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.sharded = is_sharded(accelerator)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, snapshot: dict) -> Path | None:
        """A step-N checkpoint of the loop at ``snapshot`` (``LoopState.snapshot``), the oldest
        beyond ``keep`` removed; its path (None on the other processes unless sharded)."""
        if self.sharded:
            return save_sharded_checkpoint(
                self.accelerator, self.root, self.scheduler, snapshot, self.keep
            )
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.root,
                self.accelerator.unwrap_model(self.model),
                self.optimizer,
                self.scheduler,
                snapshot,
                self.keep,
            )
        self.accelerator.wait_for_everyone()
        return path

    def resume(self) -> dict:
        """Load the latest checkpoint into the model, optimizer and scheduler; the loop state it saved."""
        ckpt = self.latest()
        if ckpt is None:
            raise FtcliError(
                f"nothing to resume: {self.root} holds no checkpoint",
                hint="start the run without --resume",
            )
        if self.sharded:
            state = read_json(ckpt / "state.json")
            check_hashes(ckpt, state.pop("sha256", {}), "checkpoint")  # every shard, as written
            self.accelerator.load_state(str(ckpt))
            self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
            return state
        model = self.accelerator.unwrap_model(self.model)
        return load_checkpoint(ckpt, model, self.optimizer, self.scheduler)

    def clear(self) -> None:
        """A fresh start: an earlier run's checkpoints are not resumed into this one."""
        shutil.rmtree(self.root, ignore_errors=True)

    def save_best(self, step: int, val_loss: float) -> None:
        save_best(
            self.root, self.accelerator.unwrap_model(self.model), self.optimizer, step, val_loss
        )

    def restore_best(self) -> int | None:
        return restore_best(self.root, self.accelerator.unwrap_model(self.model))
