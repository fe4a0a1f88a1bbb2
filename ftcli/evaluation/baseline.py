"""What the fine-tuned model is compared with.

- ``base``: the model as the run started. For a causal LM that is the pre-trained model, prompted
  zero-shot with the same template. For classification the pre-trained body has no trained head:
  the run records the fresh head it began with (``init/head.safetensors``) and the baseline uses
  exactly that head, so it is the run's own starting point (chance level). A run trained for 0
  steps is then the same model, and the comparison says "no significant change" for that reason.
- ``probe``: a linear probe, the fair bar for classification: the base frozen, only the head
  trained on the run's training split (features computed once, AdamW, the epoch with the lowest
  validation loss kept, seeded).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftcli.data.tokenize import collate
from ftcli.errors import FtcliError
from ftcli.models import HEAD_NAMES, load_recipe_base, pads_left
from ftcli.recipe import Recipe
from ftcli.sources import local_model_dir, resolve_model
from ftcli.util import atomic_dir

INIT_HEAD = Path("init") / "head.safetensors"
PROBE_EPOCHS = 30
PROBE_LR = 1e-3


def head_state(model) -> dict:
    """The task head's weights, named as in the plain base model (peft's wrappers unwrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, p in base.named_parameters():
        if ".original_module." in name:
            continue
        plain = name.replace(".modules_to_save.default.", ".")
        if any(part in HEAD_NAMES for part in plain.split(".")[:-1]):
            out[plain] = p.detach().cpu().float().contiguous().clone()
    return out


def save_initial_head(model, run_dir: Path) -> Path | None:
    """Record the fresh head a classification run starts from (before the first step)."""

    state = head_state(model)
    if not state:
        return None
    target = run_dir / INIT_HEAD.parent
    with atomic_dir(target) as tmp:
        save_file(state, str(tmp / INIT_HEAD.name))
    return run_dir / INIT_HEAD


def load_head(model, state: dict) -> None:
    """Put a recorded head into a freshly loaded base model; every tensor must find its place."""
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params or params[k].shape != state[k].shape]
    if missing:
        raise FtcliError(
            f"the recorded initial head does not fit the base model ({missing[0]})",
            hint="the run's init/head.safetensors belongs to another model",
        )
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))


def load_base(recipe: Recipe, run_dir: Path, labels: list[str] | None, tokenizer, device: str):
    """(base model as the run started, a sentence that says what it is)."""

    model_dir = local_model_dir(resolve_model(recipe.model.name, recipe.model.revision))
    torch.manual_seed(recipe.train.seed)
    model = load_recipe_base(recipe, model_dir, labels, tokenizer, device)
    if recipe.task != "classification":
        return model.eval(), (
            f"the pre-trained {recipe.model.name}, untouched, prompted zero-shot with the same "
            "template as the fine-tune"
        )
    init = run_dir / INIT_HEAD
    if init.is_file():
        load_head(model, load_file(str(init)))
        note = (
            "the pre-trained body with the fresh, untrained head this run started from (init/head.safetensors): "
            "chance level by design. `--baseline probe` trains that head alone: the fair bar"
        )
    else:
        note = (
            "the pre-trained body with a fresh head seeded with train.seed (this run did not record its initial "
            "head): chance level. `--baseline probe` trains the head alone: the fair bar"
        )
    return model.eval(), note


# --------------------------------------------------------------------------- linear probe


def _head_module(model):
    for name in HEAD_NAMES:
        mod = getattr(model, name, None)
        if mod is not None:
            return name, mod
    raise FtcliError(
        f"{type(model).__name__} has no task head named {' or '.join(HEAD_NAMES)}",
        hint="a linear probe needs a sequence-classification model",
    )


def _last_non_pad(input_ids, pad_id):

    mask = (input_ids != pad_id).int()
    return (torch.arange(input_ids.shape[-1], device=input_ids.device) * mask).argmax(-1)


def head_inputs(
    model, feats: list[dict], pad_id: int, batch_size: int, device, progress=None
) -> tuple[list, bool]:
    """What the frozen body feeds the head, per example (pooled at the last token for heads that
    score every position, as transformers pools their logits). Returns (inputs, pooled)."""

    _, head = _head_module(model)
    captured = {}
    hook = head.register_forward_hook(
        lambda m, args, out: captured.update(x=args[0].detach(), y=out.detach())
    )
    rows: list = []
    pooled = False
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(feats), batch_size):
                batch = collate(feats[s : s + batch_size], pad_id, pads_left(model))
                ids = batch["input_ids"].to(device)
                logits = model(
                    input_ids=ids, attention_mask=batch["attention_mask"].to(device)
                ).logits
                x = captured["x"]
                if (
                    captured["y"].dim() == 3
                ):  # per-token head: pool its input where the model pools logits
                    pooled = True
                    x = x[torch.arange(x.shape[0], device=x.device), _last_non_pad(ids, pad_id)]
                check = head(x)
                if not torch.allclose(check.float(), logits.float(), atol=1e-4, rtol=1e-4):
                    raise FtcliError(
                        f"cannot build a linear probe for {type(model).__name__}: its head's inputs "
                        "do not reproduce its logits",
                        hint="use --baseline base or another run",
                    )
                rows.extend(x.float().cpu())
                if progress:
                    progress(len(x))
    finally:
        hook.remove()
    return rows, pooled


def train_probe(
    model,
    train_x: list,
    train_y: list[int],
    val_x: list,
    val_y: list[int],
    batch_size: int,
    seed: int,
    epochs: int = PROBE_EPOCHS,
    lr: float = PROBE_LR,
) -> tuple[object, dict]:
    """Train a copy of the model's head on frozen features; keep the epoch with the best validation loss."""
    import torch.nn.functional as F

    _, head = _head_module(model)
    probe = copy.deepcopy(head).float().cpu()
    for p in probe.parameters():
        p.requires_grad_(True)
    probe.eval()  # no dropout: the probe is judged as it will be used
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    X, Y = torch.stack(train_x), torch.tensor(train_y)
    VX, VY = (torch.stack(val_x), torch.tensor(val_y)) if val_x else (None, None)
    g = torch.Generator().manual_seed(seed)
    best = {"epoch": 0, "val_loss": float("inf"), "state": copy.deepcopy(probe.state_dict())}
    history = []
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(X), generator=g).split(batch_size):
            loss = F.cross_entropy(probe(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            tl = F.cross_entropy(probe(X), Y).item()
            vl = F.cross_entropy(probe(VX), VY).item() if VX is not None else tl
        history.append({"epoch": epoch, "train_loss": tl, "val_loss": vl})
        if vl < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": vl, "state": copy.deepcopy(probe.state_dict())}
    probe.load_state_dict(best["state"])
    info = {
        "epochs": epochs,
        "lr": lr,
        "optimizer": "adamw",
        "chosen_epoch": best["epoch"],
        "chosen_by": "validation loss" if VX is not None else "last training loss",
        "seed": seed,
        "train_examples": len(X),
        "history": history,
    }
    return probe, info


def probe_probabilities(
    recipe: Recipe, model, tokenizer, feats: dict[str, list[dict]], device, progress=None
) -> tuple[list, dict]:
    """Test-split class probabilities of a linear probe on the frozen base ``model``;
    ``progress(n)`` is told of each batch of examples the frozen base has read."""
    pad, bs = tokenizer.pad_token_id, recipe.eval.batch_size
    xs = {split: head_inputs(model, f, pad, bs, device, progress)[0] for split, f in feats.items()}
    ys = {split: [f["labels"] for f in fs] for split, fs in feats.items()}
    probe, info = train_probe(
        model,
        xs["train"],
        ys["train"],
        xs.get("validation", []),
        ys.get("validation", []),
        recipe.train.batch_size,
        recipe.train.seed,
    )
    with torch.no_grad():
        probs = torch.softmax(probe(torch.stack(xs["test"])).float(), dim=-1).tolist()
    return probs, info
