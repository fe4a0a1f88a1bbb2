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
from dataclasses import asdict, dataclass
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.util import atomic_dir, human_bytes, read_json, write_json

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


@dataclass(frozen=True)
class Merged:
    """What ``merge`` wrote and the figures that prove it (also saved as OUT_DIR/merge.json)."""

    out_dir: str
    base_model: str
    task: str
    method: str
    into: str
    dtype: str
    samples: int
    sample_source: str
    fold_check: dict | None  # float32 merged vs base + adapter; None for a full fine-tuning export
    saved_check: dict  # the written folder, reloaded in its dtype, vs the same reference
    max_logit_diff: float  # headline figures: those of saved_check
    relative_diff: float
    tolerance: float
    prediction_agreement: float
    passed: bool
    lora_modules_merged: int
    saved_modules: list
    parameters: int
    dequantized_vs_original: dict | None
    labels: list | None
    bytes_written: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Source:
    """What ``ftcli merge`` was pointed at: a LoRA adapter, or the model/ of a full fine-tuning run."""

    kind: str  # "adapter" | "full"
    path: Path  # the adapter folder or the model folder
    run_dir: Path | None  # the run folder around it, when there is one


def find_source(path: str | Path) -> Source:
    """An adapter folder, a full fine-tuning model/ folder, or a run folder holding either."""
    p = Path(path)
    if not p.exists():
        raise FtcliError(f"{p} does not exist", hint="give an adapter folder or a run folder, e.g. runs/quickstart")

    def run_of(d: Path) -> Path | None:
        return d.parent if (d.parent / "run.json").exists() or (d.parent / "recipe.yaml").exists() else None

    if (p / "adapter_config.json").is_file():
        return Source("adapter", p, run_of(p))
    if (p / "adapter" / "adapter_config.json").is_file():
        return Source("adapter", p / "adapter", p)
    if (p / "model" / "config.json").is_file():
        return Source("full", p / "model", p)
    if (p / "config.json").is_file() and (p / "ftcli.json").is_file():
        return Source("full", p, run_of(p))
    raise FtcliError(f"no LoRA adapter or fine-tuned model in {p} (adapter_config.json / model/ not found)",
                     hint="give an adapter folder or a run folder, e.g. runs/quickstart")


def find_adapter(path: str | Path) -> Path:
    """The adapter folder of ``path`` (an adapter folder or a run folder holding adapter/)."""
    src = find_source(path)
    if src.kind != "adapter":
        raise FtcliError(f"{path} is a full fine-tuning run: it has no adapter",
                         hint="use its model/ folder directly, or `ftcli merge` to export it")
    return src.path


def adapter_record(adapter_dir: Path) -> dict:
    """What the adapter was trained on: ftcli's record, else what peft's config says."""
    cfg = read_json(adapter_dir / "adapter_config.json")
    rec = read_json(adapter_dir / "ftcli.json") if (adapter_dir / "ftcli.json").exists() else {}
    rec.setdefault("base_model", cfg.get("base_model_name_or_path"))
    rec.setdefault("base_model_dir", cfg.get("base_model_name_or_path"))
    rec.setdefault("task", "classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm")
    rec.setdefault("method", {"kind": "lora"})
    rec["lora"] = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules"),
                   "modules_to_save": cfg.get("modules_to_save")}
    return rec


def model_record(model_dir: Path) -> dict:
    """ftcli's record of a full fine-tuning model/ folder (or what its config says)."""
    rec = read_json(model_dir / "ftcli.json") if (model_dir / "ftcli.json").exists() else {}
    cfg = read_json(model_dir / "config.json")
    archs = cfg.get("architectures") or []
    rec.setdefault("task", "classification" if any(a.endswith("ForSequenceClassification") for a in archs)
                   else "causal_lm")
    rec.setdefault("method", {"kind": "full"})
    rec.setdefault("base_model", str(model_dir))
    if rec["task"] == "classification" and not rec.get("labels") and cfg.get("id2label"):
        rec["labels"] = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
    return rec


def base_dir(rec: dict, base: str | None) -> str:
    """The local folder of the base model: ``--base`` if given, else the one the adapter records."""
    from ftcli.sources import local_model_dir, resolve_model

    spec = base or rec.get("base_model")
    if not spec:
        raise FtcliError("the adapter does not record its base model", hint="name it with --base")
    try:
        return local_model_dir(resolve_model(spec))
    except FtcliError:
        recorded = rec.get("base_model_dir")
        if base is None and recorded and Path(recorded).is_dir():
            return recorded
        raise


def model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _label_kwargs(rec: dict, tokenizer) -> dict:
    if rec["task"] != "classification":
        return {}
    labels = rec.get("labels") or []
    if not labels:
        raise FtcliError("the adapter does not record its labels (ftcli.json)", hint="merge an adapter ftcli trained")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {lab: i for i, lab in enumerate(labels)}, "pad_token_id": tokenizer.pad_token_id}


def quantized_for(rec: dict):
    """The BitsAndBytesConfig a QLoRA adapter was trained on (compute in float32 here)."""
    import torch
    from transformers import BitsAndBytesConfig

    q = rec.get("method", {}).get("quantization") or {}
    if q.get("bits", 4) == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.get("quant_type", "nf4"),
                              bnb_4bit_use_double_quant=q.get("double_quant", True),
                              bnb_4bit_compute_dtype=torch.float32)


def load_quantized_base(rec: dict, model_dir: str, tokenizer):
    """The 4-bit (or 8-bit) base exactly as training loaded it, layers missing from the checkpoint
    (a new task head, say) kept in full precision as ``adapt.load_base_model`` does."""
    import torch

    from ftcli.adapt import keep_4bit_trainable_on_cpu, unquantized_layers

    cls = model_class(rec["task"])
    qc = quantized_for(rec)
    kwargs = {"dtype": torch.float32, "device_map": {"": "cpu"}, **_label_kwargs(rec, tokenizer)}
    model = cls.from_pretrained(model_dir, quantization_config=qc, **kwargs)
    fresh = unquantized_layers(model)
    if fresh:
        from transformers.quantizers.base import get_keys_to_not_convert

        qc.llm_int8_skip_modules = sorted(set(get_keys_to_not_convert(model)) | set(fresh))
        model = cls.from_pretrained(model_dir, quantization_config=qc, **kwargs)
    keep_4bit_trainable_on_cpu(model)
    return model


def load_base(rec: dict, model_dir: str, into: str, tokenizer):
    """The base model in float32, as the adapter saw it: for QLoRA ``into='dequantized'`` loads the
    quantized base and dequantizes it (the weights training used); otherwise the original weights."""
    import torch

    method = rec.get("method", {})
    if method.get("kind") == "qlora" and into == "dequantized":
        model = load_quantized_base(rec, model_dir, tokenizer)
        model = model.dequantize(dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        model = model_class(rec["task"]).from_pretrained(model_dir, dtype=torch.float32,
                                                         **_label_kwargs(rec, tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def run_test_features(run_dir: Path | None, tokenizer, limit: int = 16) -> list[dict] | None:
    """Tokenized test examples of the run a model came from, to verify the merge on."""
    if run_dir is None or not (run_dir / "recipe.yaml").exists() or not (run_dir / "data" / "test.jsonl").exists():
        return None
    from ftcli.data import load_prepared, tokenize
    from ftcli.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    prepared = load_prepared(run_dir / "data")
    feats = tokenize(prepared.splits["test"][:limit], recipe, tokenizer, prepared.label2id).features
    return feats or None


def sample_batches(tokenizer, samples: list[dict] | None, limit: int = 16) -> list[dict]:
    """Tokenized inputs to compare on: the run's test examples, else built-in sentences."""
    from ftcli.train import collate

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
    import torch

    out = []
    with torch.no_grad():
        for b in batches:
            lg = model(**b).logits.float()
            if task != "classification":
                lg = lg[b["attention_mask"].bool()]
            out.append(lg)
    return out


def compare(reference: list, other: list, tolerance: float | None = None) -> dict:
    """Largest logit difference (absolute and relative to the logit scale) and prediction agreement.
    A non-finite logit (a float16 overflow, say) counts as an infinite difference."""
    import torch

    diffs = []
    for a, b in zip(reference, other, strict=True):
        d = (a - b).abs()
        diffs.append(math.inf if not torch.isfinite(d).all() else float(d.max()))
    diff = max(diffs)
    scale = max(1.0, max(float(a.abs().max()) for a in reference))
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, other, strict=True)])
    out = {"max_logit_diff": diff, "relative_diff": diff / scale, "logit_scale": scale,
           "prediction_agreement": float(agree.float().mean())}
    if tolerance is not None:
        out["tolerance"] = tolerance
        out["passed"] = bool(out["relative_diff"] <= tolerance)
    return out


def param_count(model) -> int:
    """Distinct parameters (tied weights once), as the saved folder holds them."""
    return sum(p.numel() for p in model.parameters())


def _bytes_needed(model, dtype: str, extra_files: list[Path]) -> int:
    import torch

    from ftcli.adapt import torch_dtype

    size = torch.tensor([], dtype=torch_dtype(dtype)).element_size()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors.values())
    return weights + sum(f.stat().st_size for f in extra_files if f.is_file())


def check_disk(out_dir: Path, need: int) -> None:
    """Refuse before writing when the folder OUT_DIR is built in cannot hold ``need`` bytes."""
    where = out_dir.parent if out_dir.parent.exists() else Path.cwd()
    free = shutil.disk_usage(where).free
    margin = max(need // 20, 16 * 2**20)  # metadata, model card, filesystem slack
    if free < need + margin:
        raise FtcliError(f"not enough disk space for {out_dir}: the merged model needs about {human_bytes(need + margin)}, "
                         f"{human_bytes(free)} free on {where}; nothing was written",
                         hint="free some space, or choose an OUT_DIR on another disk")


def check_out_dir(out_dir: Path, src: Source, force: bool) -> None:
    """Refuse an existing OUT_DIR without --force, and never one that holds the source itself."""
    resolved = out_dir.resolve()
    protected = [src.path.resolve()] + ([src.run_dir.resolve()] if src.run_dir else [])
    for p in protected:
        if resolved == p or resolved in p.parents:
            raise FtcliError(f"{out_dir} would replace {p}, which holds what is being merged",
                             hint="choose a new folder, e.g. out/merged")
    if out_dir.exists() and not out_dir.is_dir():
        raise FtcliError(f"{out_dir} exists and is not a folder", hint="choose another OUT_DIR")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FtcliError(f"{out_dir} already exists", hint="choose another folder, or pass --force to replace it")


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


def _model_card(rec: dict, m: Merged, run_info: dict | None, base_params: int) -> str:
    method = rec.get("method", {})
    kind = method.get("kind", "lora")
    lora = rec.get("lora") or {}
    sc = m.saved_check
    lines = [
        "---", "library_name: transformers", f"base_model: {rec.get('base_model')}",
        f"tags: [ftcli, {kind}, {'merged' if kind != 'full' else 'fine-tuned'}]", "---", "",
        f"# {'Merged ' + kind if kind != 'full' else 'Fully'} fine-tuned `{rec.get('base_model')}`", "",
    ]
    if kind == "full":
        lines += ["A plain transformers model: every weight was fine-tuned. It loads with `AutoModelFor...from_pretrained`",
                  "and needs neither peft nor ftcli. Exported by `ftcli merge`.", ""]
    else:
        lines += ["A plain transformers model: the LoRA update W = W0 + (alpha/r) B A is folded into the weights, so it",
                  "loads with `AutoModelFor...from_pretrained`, needs neither peft nor ftcli, and runs with no adapter",
                  "overhead. Made by `ftcli merge`.", ""]
    lines += ["| | |", "|---|---|", f"| task | {rec.get('task')} |"]
    if kind == "full":
        lines.append("| method | full fine-tuning |")
    else:
        lines.append(f"| method | {kind} r={lora.get('r')} alpha={lora.get('alpha')} "
                     f"(scale {float(lora.get('alpha') or 0) / float(lora.get('r') or 1):g}) on {lora.get('target_modules')} |")
        if m.saved_modules:
            lines.append(f"| trained in full and saved | {', '.join(m.saved_modules)} |")
        lines.append(f"| merged into | {m.into} weights{' (NF4, as training saw them)' if m.into == 'dequantized' else ''} |")
    lines.append(f"| saved as | {m.dtype}, {m.parameters:,} parameters (base: {base_params:,}) |")
    if m.fold_check:
        fc = m.fold_check
        lines.append(f"| merge check (float32) | max logit difference {fc['max_logit_diff']:.2e} "
                     f"({fc['relative_diff']:.1e} relative, tolerance {fc['tolerance']:g}), "
                     f"predictions agree {fc['prediction_agreement']:.1%} |")
    lines.append(f"| saved-folder check ({m.dtype}) | max logit difference {sc['max_logit_diff']:.2e} "
                 f"({sc['relative_diff']:.1e} relative, tolerance {sc['tolerance']:g}), "
                 f"predictions agree {sc['prediction_agreement']:.1%} on {m.samples} {m.sample_source} |")
    if m.dequantized_vs_original:
        d = m.dequantized_vs_original
        lines.append(f"| merging into {d['other']} weights instead | would move logits by up to {d['max_logit_diff']:.3g} "
                     f"({d['relative_diff']:.1e} relative), predictions agree {d['prediction_agreement']:.1%} |")
    if rec.get("labels"):
        lines.append(f"| labels | {', '.join(rec['labels'])} |")
    if run_info:
        params = run_info.get("params") or {}
        if params:
            lines.append(f"| trained parameters | {params.get('trainable', 0):,} of {params.get('total', 0):,} |")
        metrics = (run_info.get("eval") or {}).get("metrics") or {}
        n = (run_info.get("eval") or {}).get("n")
        for k, v in metrics.items():
            if isinstance(v, float):
                lines.append(f"| test {k} | {v:.4f}{f' ({n} examples)' if n else ''} |")
    lines += ["", "## Use", "", "```python",
              f"from transformers import {model_class_name(rec['task'])}, AutoTokenizer",
              "model = " + model_class_name(rec["task"]) + ".from_pretrained(\"PATH\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")", "```"]
    if rec.get("recipe"):
        lines += ["", "## Recipe", "", "```yaml", rec["recipe"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def model_class_name(task: str) -> str:
    return "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"


def _fail(what: str, figures: dict, dtype: str, hint: str) -> FtcliError:
    d = figures["max_logit_diff"]
    how = "non-finite logits (an overflow)" if math.isinf(d) else (
        f"logits that differ from base + adapter by up to {d:.3g} ({figures['relative_diff']:.3g} of the logit scale)")
    return FtcliError(f"merge verification failed: {what} gives {how}, above the tolerance {figures['tolerance']:g} "
                      f"for {dtype}; predictions agree on {figures['prediction_agreement']:.1%}; nothing was written",
                      hint=hint)


def merge(source: str | Path, out_dir: str | Path, *, base: str | None = None, dtype: str = "float32",
          into: str = "dequantized", samples: list[dict] | None = None, force: bool = False,
          compare_into: bool = True) -> Merged:
    """Merge the adapter in ``source`` (an adapter or run folder) into its base, verify, write ``out_dir``.
    A full fine-tuning run is exported in ``dtype`` and verified the same way."""
    import torch

    from ftcli.adapt import tokenizer_from, torch_dtype

    if dtype not in TOLERANCE:
        raise FtcliError(f"dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if into not in INTO:
        raise FtcliError(f"into {into!r} is not one of: {', '.join(INTO)}")
    t0 = time.perf_counter()
    src = find_source(source)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, src, force)
    rec = adapter_record(src.path) if src.kind == "adapter" else model_record(src.path)
    run_info = None
    if src.run_dir is not None:
        if (src.run_dir / "run.json").exists():
            run_info = read_json(src.run_dir / "run.json")
        if (src.run_dir / "recipe.yaml").exists():
            rec["recipe"] = (src.run_dir / "recipe.yaml").read_text()
    tok = tokenizer_from(src.path)
    if samples is None:
        samples = run_test_features(src.run_dir, tok)
    sample_source = "test examples" if samples else "built-in sentences"
    batches = sample_batches(tok, samples)
    task = rec["task"]
    kind = rec.get("method", {}).get("kind", "lora")
    is_qlora = kind == "qlora"
    into = into if is_qlora else ("original" if src.kind == "adapter" else "fine-tuned")

    other_into = None
    fold = None
    n_lora = 0
    saved_modules: list[str] = []
    if src.kind == "full":
        model = model_class(task).from_pretrained(src.path, dtype=torch.float32).eval()
        base_params = param_count(model)
        reference = logits_on(model, batches, task)
    else:
        from peft import PeftModel

        model_dir = base_dir(rec, base)
        try:
            base_model = load_base(rec, model_dir, into, tok)
            base_params = param_count(base_model)
            model = PeftModel.from_pretrained(base_model, src.path).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise FtcliError(f"cannot load the base model and the adapter together: {str(exc).splitlines()[0]}",
                             hint="name the base the adapter was trained on with --base") from None
        reference = logits_on(model, batches, task)
        if is_qlora and compare_into:  # how far apart are "merge into dequantized" and "into original"?
            other = "original" if into == "dequantized" else "dequantized"
            alt = PeftModel.from_pretrained(load_base(rec, model_dir, other, tok), src.path).eval()
            other_into = {**compare(reference, logits_on(alt, batches, task)), "other": other}
            del alt
        n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
        saved_modules = sorted({n.split(".modules_to_save")[0].rsplit(".", 1)[-1]
                                for n, _ in model.named_modules() if n.endswith(".modules_to_save")})
        try:
            model = model.merge_and_unload(safe_merge=True)
        except ValueError as exc:  # peft's safe_merge found NaNs: the adapter itself is broken
            raise FtcliError(f"the adapter cannot be merged: {exc}") from None
        fold = compare(reference, logits_on(model, batches, task), FOLD_TOLERANCE)
        if not fold["passed"]:
            raise _fail("the merged model (float32)", fold, "float32",
                        "check that --base is the model the adapter was trained on")

    model = model.to(torch_dtype(dtype))
    n_params = param_count(model)
    if n_params != base_params:
        raise FtcliError(f"the merged model has {n_params:,} parameters but its base has {base_params:,}; "
                         "nothing was written", hint="this is a bug in ftcli or peft: please report it")
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    if task == "causal_lm":
        _finish_generation_config(model, tok)
    check_disk(out_dir, _bytes_needed(model, dtype, [f for f in src.path.iterdir() if f.name.startswith("tokenizer")
                                                     or f.suffix in (".jinja", ".model", ".txt")]))

    with sigterm_as_interrupt(), atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del model
        # the folder as written, loaded the way a user will: plain transformers, no peft, no ftcli
        reloaded = model_class(task).from_pretrained(tmp, dtype=torch_dtype(dtype)).eval()
        saved = compare(reference, logits_on(reloaded, batches, task), TOLERANCE[dtype])
        del reloaded
        if not saved["passed"]:
            raise _fail(f"the saved {dtype} folder", saved, dtype,
                        "merge in float32 (--dtype float32)" if dtype != "float32" else
                        "this is a bug in ftcli or transformers: please report it")
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        summary = Merged(
            out_dir=str(out_dir), base_model=str(rec.get("base_model")), task=task, method=kind, into=into,
            dtype=dtype, samples=sum(int(b["input_ids"].shape[0]) for b in batches), sample_source=sample_source,
            fold_check=fold, saved_check=saved, max_logit_diff=saved["max_logit_diff"],
            relative_diff=saved["relative_diff"], tolerance=saved["tolerance"],
            prediction_agreement=saved["prediction_agreement"], passed=True, lora_modules_merged=n_lora,
            saved_modules=saved_modules, parameters=n_params, dequantized_vs_original=other_into,
            labels=rec.get("labels") if task == "classification" else None, bytes_written=written,
            seconds=round(time.perf_counter() - t0, 3))
        write_json(tmp / "merge.json", summary.as_dict())
        (tmp / "README.md").write_text(_model_card(rec, summary, run_info, base_params), encoding="utf-8")
    return summary
