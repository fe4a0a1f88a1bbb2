"""merge(): fold a LoRA adapter into its base, W = W0 + (alpha/r) B A, and prove it worked.

Two checks, both on the same sample inputs (the run's test examples, else built-in text):

1. the fold itself, in float32: the merged model against base + adapter (unmerged). The merge is
   exact arithmetic, so it must agree to 1e-4 of the logit scale whatever dtype is saved;
2. the folder as written: it is loaded back with plain transformers, in the saved dtype, and
   compared with the same reference, within the tolerance of that dtype (see ``TOLERANCE``).

Checking the fold in float32 first means a lossy save dtype cannot hide a wrong merge inside its
wider tolerance; checking the reloaded folder catches what goes wrong on the way to disk (a head
left out, tied weights lost, a float16 overflow). For QLoRA the update is folded, by default, into
the NF4-dequantized weights the adapter was trained against, so the merged model answers like the
adapter did; ``into='original'`` folds it into the full-precision weights instead, and the summary
says how far the two differ. A full fine-tuning run has nothing to fold: its model/ is exported in
the requested dtype and checked the same way. The output is built under a temporary name beside
OUT_DIR and renamed into place only when complete; an error, Ctrl-C or SIGTERM leaves nothing.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ftcli.card import model_card
from ftcli.data.tokenize import collate, tokenize
from ftcli.errors import FtcliError
from ftcli.models import (
    attach_adapter,
    base_dir,
    load_base_for,
    load_folder,
    tokenizer_from,
    torch_dtype,
    verify_trained,
)
from ftcli.recipe import PROMPT_KINDS
from ftcli.rundir import (
    MergeRecord,
    Source,
    find_source,
    open_run,
    read_model_record,
    read_run_record,
)
from ftcli.util import atomic_dir, file_hashes, human_bytes, write_json

# Largest |saved - reference| logit difference, relative to max(1, largest |reference| logit).
# float32: the fold is exact up to summation order (measured 5e-7 relative on the quickstart, 2e-6 on
# SmolLM2-135M); 1e-4 leaves room for deeper models and still fails any real mistake.
# bfloat16 keeps 8 significant bits (unit roundoff 2^-8), float16 11 (2^-11): casting every weight
# moves the logits by rounding noise that grows with depth and vocabulary. Measured on the saved
# folders against the float32 reference: MiniLM-L6 classifier bf16 5.1e-3, fp16 5.8e-4; SmolLM2-135M
# (30 layers, 49k vocabulary) bf16 4.2e-2, fp16 9.6e-3. The tolerances leave ~2.5x headroom over the
# deeper model: 0.1 and 0.025. They still fail what breaks in a save (a head or layer left out, tied
# weights lost, a float16 overflow: differences of the order of the logits themselves), and the
# merge arithmetic is held to FOLD_TOLERANCE in float32 whatever the saved dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.025}
FOLD_TOLERANCE = 1e-4  # the merge itself, always checked in float32
DTYPES = tuple(TOLERANCE)
INTO = ("dequantized", "original")
BUILTIN_SAMPLES = [
    "The film was a delight from start to finish.",
    "I would not recommend this to anyone.",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "A slow, muddled story with flat characters.",
    "Hello! How are you today?",
]


def check_choices(dtype: str, into: str, flag: str = "") -> None:
    """One FtcliError for a saved dtype or a QLoRA target merge does not know; ``flag`` is the prefix
    the message names them with (``--`` for the command line)."""
    if dtype not in DTYPES:
        raise FtcliError(f"{flag}dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if into not in INTO:
        raise FtcliError(f"{flag}into {into!r} is not one of: {', '.join(INTO)}")


def run_test_features(run_dir: Path | None, tokenizer, limit: int = 16) -> list[dict] | None:
    """Tokenized test examples of the run a model came from, to verify the merge on."""
    if (
        run_dir is None
        or not (run_dir / "recipe.yaml").exists()
        or not (run_dir / "data" / "test.jsonl").exists()
    ):
        return None
    rd = open_run(run_dir)
    feats = tokenize(rd.examples[:limit], rd.recipe, tokenizer, rd.prepared.label2id).features
    return feats or None


def sample_batches(tokenizer, samples: list[dict] | None, limit: int = 16) -> list[dict]:
    """Tokenized inputs to compare on: the run's test examples, else built-in sentences."""
    if samples:
        feats = [{"input_ids": f["input_ids"], "labels": 0} for f in samples[:limit]]
    else:
        enc = tokenizer(BUILTIN_SAMPLES, add_special_tokens=True)
        feats = [{"input_ids": ids, "labels": 0} for ids in enc["input_ids"] if ids]
    if not feats:
        raise FtcliError("no sample inputs to verify the merge on")
    batches = []
    for i in range(0, len(feats), 8):
        b = collate(feats[i : i + 8], tokenizer.pad_token_id)
        batches.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return batches


def logits_on(model, batches: list[dict], task: str) -> list:
    """Logits at real (non-pad) positions, per batch, in float32."""
    out = []
    with torch.no_grad():
        for b in batches:
            lg = model(**b).logits.float()
            if task not in ("classification", "reward"):  # classifiers: one row of logits each
                lg = lg[b["attention_mask"].bool()]
            out.append(lg)
    return out


def compare(reference: list, other: list, tolerance: float | None = None) -> dict:
    """Largest logit difference (absolute and relative to the logit scale) and prediction agreement.
    A non-finite logit (a float16 overflow, say) counts as an infinite difference."""
    diffs = []
    for a, b in zip(reference, other, strict=True):
        d = (a - b).abs()
        diffs.append(math.inf if not torch.isfinite(d).all() else float(d.max()))
    diff = max(diffs)
    scale = max(1.0, max(float(a.abs().max()) for a in reference))
    agree = torch.cat(
        [(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, other, strict=True)]
    )
    out = {
        "max_logit_diff": diff,
        "relative_diff": diff / scale,
        "logit_scale": scale,
        "prediction_agreement": float(agree.float().mean()),
    }
    if tolerance is not None:
        out["tolerance"] = tolerance
        out["passed"] = bool(out["relative_diff"] <= tolerance)
    return out


def param_count(model) -> int:
    """Distinct parameters (tied weights once), as the saved folder holds them."""
    return sum(p.numel() for p in model.parameters())


def _bytes_needed(model, dtype: str, extra_files: list[Path]) -> int:
    size = torch.tensor([], dtype=torch_dtype(dtype)).element_size()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(
        t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors.values()
    )
    return weights + sum(f.stat().st_size for f in extra_files if f.is_file())


def check_disk(out_dir: Path, need: int) -> None:
    """Refuse before writing when the folder OUT_DIR is built in cannot hold ``need`` bytes."""
    where = out_dir.parent if out_dir.parent.exists() else Path.cwd()
    free = shutil.disk_usage(where).free
    margin = max(need // 20, 16 * 2**20)  # metadata, model card, filesystem slack
    if free < need + margin:
        raise FtcliError(
            f"not enough disk space for {out_dir}: the merged model needs about {human_bytes(need + margin)}, "
            f"{human_bytes(free)} free on {where}; nothing was written",
            hint="free some space, or choose an OUT_DIR on another disk",
        )


def check_out_dir(out_dir: Path, src: Source, force: bool) -> None:
    """Refuse an existing OUT_DIR without --force, and never one that holds the source itself."""
    resolved = out_dir.resolve()
    protected = [src.path.resolve()] + ([src.run_dir.resolve()] if src.run_dir else [])
    for p in protected:
        if resolved == p or resolved in p.parents:
            raise FtcliError(
                f"{out_dir} would replace {p}, which holds what is being merged",
                hint="choose a new folder, e.g. out/merged",
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise FtcliError(f"{out_dir} exists and is not a folder", hint="choose another OUT_DIR")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FtcliError(
            f"{out_dir} already exists", hint="choose another folder, or pass --force to replace it"
        )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so the temporary output folder is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish_generation_config(model, tokenizer) -> None:
    """A causal LM's generation settings must stop at the tokenizer's end-of-turn token and know the
    pad token, or generation from the merged folder runs on past the answer."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    eos = tokenizer.eos_token_id
    if eos is not None:
        current = gc.eos_token_id
        ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
        if eos not in ids:
            ids.append(eos)
        gc.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gc.pad_token_id is None and tokenizer.pad_token_id is not None:
        gc.pad_token_id = tokenizer.pad_token_id


def _fail(what: str, figures: dict, dtype: str, hint: str) -> FtcliError:
    d = figures["max_logit_diff"]
    how = (
        "non-finite logits (an overflow)"
        if math.isinf(d)
        else (
            f"logits that differ from base + adapter by up to {d:.3g} ({figures['relative_diff']:.3g} of the logit scale)"
        )
    )
    return FtcliError(
        f"merge verification failed: {what} gives {how}, above the tolerance {figures['tolerance']:g} "
        f"for {dtype}; predictions agree on {figures['prediction_agreement']:.1%}; nothing was written",
        hint=hint,
    )


def merge(
    source: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str = "float32",
    into: str = "dequantized",
    samples: list[dict] | None = None,
    force: bool = False,
    compare_into: bool = True,
) -> MergeRecord:
    """Merge the adapter in ``source`` (an adapter or run folder) into its base, verify, write ``out_dir``.
    A full fine-tuning run is exported in ``dtype`` and verified the same way."""
    check_choices(dtype, into)
    t0 = time.perf_counter()
    src = find_source(source)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, src, force)
    rec = read_model_record(src.path)
    if rec.kind in PROMPT_KINDS:
        raise FtcliError(
            f"nothing to merge: {rec.kind} tuning learns virtual tokens, so there are no weights "
            f"to fold into the base; use the adapter as it is: ftcli predict {source}"
        )
    verify_trained(src.path, rec)
    run_info = read_run_record(src.run_dir) if src.run_dir is not None else None
    recipe_text = None
    if src.run_dir is not None and (src.run_dir / "recipe.yaml").exists():
        recipe_text = (src.run_dir / "recipe.yaml").read_text()
    tok = tokenizer_from(src.path)
    if samples is None:
        samples = run_test_features(src.run_dir, tok)
    sample_source = "test examples" if samples else "built-in sentences"
    batches = sample_batches(tok, samples)
    task = rec.task
    kind = rec.kind
    into = into if kind == "qlora" else ("original" if src.kind == "adapter" else "fine-tuned")

    other_into = None
    fold = None
    n_lora = 0
    saved_modules: list[str] = []
    if src.kind == "full":
        model = load_folder(src.path, task)
        base_params = param_count(model)
        reference = logits_on(model, batches, task)
    else:
        model_dir = base_dir(rec, base)
        try:
            base_model = load_base_for(rec, model_dir, into, tok)
            base_params = param_count(base_model)
            model = attach_adapter(base_model, src.path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise FtcliError(
                f"cannot load the base model and the adapter together: {str(exc).splitlines()[0]}",
                hint="name the base the adapter was trained on with --base",
            ) from None
        reference = logits_on(model, batches, task)
        if (
            kind == "qlora" and compare_into
        ):  # how far apart are "merge into dequantized" and "into original"?
            other = "original" if into == "dequantized" else "dequantized"
            alt = attach_adapter(load_base_for(rec, model_dir, other, tok), src.path)
            other_into = {**compare(reference, logits_on(alt, batches, task)), "other": other}
            del alt
        n_lora = sum(1 for _, m in model.named_modules() if isinstance(m, BaseTunerLayer))
        saved_modules = sorted(
            {
                n.split(".modules_to_save")[0].rsplit(".", 1)[-1]
                for n, _ in model.named_modules()
                if n.endswith(".modules_to_save")
            }
        )
        try:
            model = model.merge_and_unload(safe_merge=True)
        except ValueError as exc:  # peft's safe_merge found NaNs: the adapter itself is broken
            raise FtcliError(f"the adapter cannot be merged: {exc}") from None
        fold = compare(reference, logits_on(model, batches, task), FOLD_TOLERANCE)
        if not fold["passed"]:
            raise _fail(
                "the merged model (float32)",
                fold,
                "float32",
                "check that --base is the model the adapter was trained on",
            )

    model = model.to(torch_dtype(dtype))
    n_params = param_count(model)
    if n_params != base_params:
        raise FtcliError(
            f"the merged model has {n_params:,} parameters but its base has {base_params:,}; "
            "nothing was written",
            hint="this is a bug in ftcli or peft: please report it",
        )
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    if task == "causal_lm":
        _finish_generation_config(model, tok)
    check_disk(
        out_dir,
        _bytes_needed(
            model,
            dtype,
            [
                f
                for f in src.path.iterdir()
                if f.name.startswith("tokenizer") or f.suffix in (".jinja", ".model", ".txt")
            ],
        ),
    )

    with sigterm_as_interrupt(), atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del model
        # the folder as written, loaded the way a user will: plain transformers, no peft, no ftcli
        reloaded = load_folder(tmp, task, dtype)
        saved = compare(reference, logits_on(reloaded, batches, task), TOLERANCE[dtype])
        del reloaded
        if not saved["passed"]:
            raise _fail(
                f"the saved {dtype} folder",
                saved,
                dtype,
                "merge in float32 (--dtype float32)"
                if dtype != "float32"
                else "this is a bug in ftcli or transformers: please report it",
            )
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        summary = MergeRecord(
            out_dir=str(out_dir),
            base_model=str(rec.base_model),
            task=task,
            method=kind,
            into=into,
            dtype=dtype,
            samples=sum(int(b["input_ids"].shape[0]) for b in batches),
            sample_source=sample_source,
            fold_check=fold,
            saved_check=saved,
            lora_modules_merged=n_lora,
            saved_modules=saved_modules,
            parameters=n_params,
            dequantized_vs_original=other_into,
            labels=rec.labels if task == "classification" else None,
            bytes_written=written,
            seconds=round(time.perf_counter() - t0, 3),
            sha256=file_hashes(tmp, "*.safetensors"),
        )
        write_json(tmp / "merge.json", summary.as_dict())
        card = model_card(rec, summary, run_info, base_params, recipe_text)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return summary


def summary_rows(m: MergeRecord) -> list[tuple[str, object]]:
    """``ftcli merge``'s table: what was merged, both checks' figures, what was written."""
    rows: list[tuple[str, object]] = [
        ("base", m.base_model),
        ("method", m.method),
        ("merged into", f"{m.into} weights, saved {m.dtype}"),
        ("parameters", f"{m.parameters:,}"),
        ("LoRA modules folded", m.lora_modules_merged),
    ]
    if m.saved_modules:
        rows.append(("saved modules", ", ".join(m.saved_modules)))
    if m.fold_check:
        fc = m.fold_check
        rows.append(
            (
                "merge check (float32)",
                f"max logit difference {fc['max_logit_diff']:.3e} "
                f"({fc['relative_diff']:.2e} relative, tolerance {fc['tolerance']:g}), "
                f"predictions agree {fc['prediction_agreement']:.1%}",
            )
        )
    rows.append(
        (
            f"saved folder ({m.dtype})",
            f"max logit difference {m.max_logit_diff:.3e} "
            f"({m.relative_diff:.2e} relative, tolerance {m.tolerance:g}), "
            f"predictions agree {m.prediction_agreement:.1%} on {m.samples} {m.sample_source}",
        )
    )
    if m.dequantized_vs_original:
        d = m.dequantized_vs_original
        rows.append(
            (
                f"vs merging into {d['other']}",
                f"max logit difference {d['max_logit_diff']:.3e} "
                f"({d['relative_diff']:.2e} relative), predictions agree {d['prediction_agreement']:.1%}",
            )
        )
    rows.append(("written", f"{m.bytes_written / 2**20:.1f} MiB in {m.seconds:.1f} s"))
    return rows
