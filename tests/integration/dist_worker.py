"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by test_distributed.py; not a test itself.

``timeout``: rank 0 waits in a collective rank 1 never joins; ``train.ddp_timeout_s`` ends it.
``ddp``: one step of ftcli's DDP path (make_accelerator, adapt, the prepared loader) against the
full-batch gradient of one process. ``fsdp-lora`` / ``fsdp-full``: ftcli's model sharded with raw
FSDP2 ``fully_shard`` on an explicit CPU mesh (docs/traps.md#fsdp-on-a-cpu-host), trained a few
AdamW steps from
ftcli's build_optimizer, gathered with ftcli.distributed.full_state_dict, against one process.
Rank 0 writes the figures as JSON to the path given.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
from accelerate.utils import set_seed

from ftcli.adapt import adapt
from ftcli.data.examples import prepare
from ftcli.data.tokenize import collate, tokenize
from ftcli.distributed import full_state_dict
from ftcli.models import load_tokenizer
from ftcli.pipeline import make_accelerator
from ftcli.recipe import load_recipe
from ftcli.train import build_optimizer, make_loader

STEPS = 3
HALF = 4  # examples per process per step; the single process takes 2 * HALF


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(mode: str, recipe_path: str, out: str) -> None:
    recipe = load_recipe(recipe_path)
    acc, _ = make_accelerator(recipe)  # torchrun's env: a gloo process group of 2
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, world
    if mode == "timeout":  # rank 1 stays alive but silent; rank 0's collective must give up
        if rank == 1:
            time.sleep(120)
            return
        t0 = time.perf_counter()
        try:
            torch.distributed.all_reduce(torch.ones(1))
            error = None
        except Exception as exc:  # what gloo raises when train.ddp_timeout_s runs out
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
        with open(out, "w") as f:
            json.dump({"waited_s": time.perf_counter() - t0, "error": error}, f)
        raise SystemExit(1)  # torchrun then stops rank 1 at once
    tok, _, model_dir = load_tokenizer(recipe.model)
    prepared = prepare(recipe)
    feats = tokenize(prepared.splits["train"], recipe, tok, prepared.label2id).features
    set_seed(0)  # the same LoRA init on both ranks (fully_shard does not broadcast)
    model = adapt(recipe, tok, model_dir, prepared.labels, "cpu", 0).model
    model.train()
    ref = copy.deepcopy(model)
    result: dict = {"world": world, "distributed_type": acc.distributed_type.value}
    pad = tok.pad_token_id

    if mode == "ddp":
        full = collate(feats[: 2 * HALF], pad)
        ref(**full).loss.backward()
        ddp = acc.prepare(model)
        loader = acc.prepare(make_loader(feats[: 2 * HALF], HALF, pad))
        batch = next(iter(loader))
        ddp(**batch).loss.backward()
        got = {
            n: p.grad.detach().clone()
            for n, p in acc.unwrap_model(ddp).named_parameters()
            if p.requires_grad
        }
        want = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
        # the two ranks hold the same averaged gradient
        first = next(iter(got.values()))
        gathered = [torch.zeros_like(first) for _ in range(world)]
        torch.distributed.all_gather(gathered, first)
        result.update(
            wrapped=type(ddp).__name__,
            rank_batch_sizes=acc.gather(torch.tensor([len(batch["labels"])])).tolist(),
            grad_max_diff=max_diff(got, want),
            grad_scale=max(v.abs().max().item() for v in want.values()),
            ranks_agree=(gathered[0] - gathered[1]).abs().max().item(),
            n_grads=len(got),
        )
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        start = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        mesh = init_device_mesh("cpu", (world,))  # the default mesh is CUDA
        layers = set(getattr(model, "_no_split_modules", None) or []) | {"LlamaDecoderLayer"}
        wrapped = [m for m in model.modules() if type(m).__name__ in layers]
        for layer in wrapped:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt, ref_opt = build_optimizer(recipe, model), build_optimizer(recipe, ref)
        losses = []
        for step in range(STEPS):
            lo = step * 2 * HALF
            mine = collate(feats[lo + rank * HALF : lo + (rank + 1) * HALF], pad)
            loss = model(**mine).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            ref_loss = ref(**collate(feats[lo : lo + 2 * HALF], pad)).loss
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            losses.append(ref_loss.item())
        sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in ref.parameters())
        gathered = full_state_dict(model)  # a collective: every rank calls it
        if rank == 0:
            want = {k: v.detach() for k, v in ref.state_dict().items()}
            trainable = [n for n, p in ref.named_parameters() if p.requires_grad]
            result.update(
                wrapped_layers=len(wrapped),
                sharded_params=len(sharded),
                local_share=local / total,
                state_max_diff=max_diff(gathered, want),
                moved=min((want[n] - start[n]).abs().max().item() for n in trainable),
                n_trainable=len(trainable),
                n_keys=len(gathered),
                ref_losses=losses,
            )
        else:
            assert gathered == {}, len(gathered)  # only rank 0 receives the full state
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
