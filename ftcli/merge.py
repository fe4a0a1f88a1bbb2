"""merge(): fold a LoRA adapter into its base, W = W0 + (alpha/r) B A, and prove it worked.

The merged model is checked against base + adapter (unmerged) on sample inputs: the largest logit
difference and the agreement of predictions are reported, and a merge beyond the tolerance for
its dtype fails. For QLoRA the update is folded, by default, into the NF4-dequantized weights the
adapter was trained against, so the merged model answers like the adapter did. The output is a
plain transformers folder, built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.util import atomic_dir, human_bytes, write_json

# largest |merged - reference| logit difference, relative to max(1, largest |reference| logit)
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
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
    out_dir: str
    base_model: str
    task: str
    method: str
    into: str
    dtype: str
    samples: int
    max_logit_diff: float
    relative_diff: float
    tolerance: float
    prediction_agreement: float
    passed: bool
    lora_modules_merged: int
    dequantized_vs_original: dict | None
    bytes_written: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def find_adapter(path: str | Path) -> Path:
    """An adapter folder, or a run folder holding adapter/."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if (p / "model" / "config.json").is_file():
        raise FtcliError(f"{p} is a full fine-tuning run: model/ is already a plain model, nothing to merge")
    raise FtcliError(f"no LoRA adapter in {p} (adapter_config.json not found)",
                     hint="give an adapter folder or a run folder, e.g. runs/quickstart")


def adapter_record(adapter_dir: Path) -> dict:
    """What the adapter was trained on: ftcli's record, else what peft's config says."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    rec = json.loads((adapter_dir / "ftcli.json").read_text()) if (adapter_dir / "ftcli.json").exists() else {}
    rec.setdefault("base_model", cfg.get("base_model_name_or_path"))
    rec.setdefault("base_model_dir", cfg.get("base_model_name_or_path"))
    rec.setdefault("task", "classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm")
    rec.setdefault("method", {"kind": "lora"})
    rec["lora"] = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules")}
    return rec


def _base_dir(rec: dict, base: str | None) -> str:
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


def load_base(rec: dict, model_dir: str, into: str, tokenizer):
    """The base model in fp32, as the adapter saw it: for QLoRA ``into='dequantized'`` loads the
    4-bit base and dequantizes it (the weights training used); otherwise the original weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict = {"dtype": torch.float32}
    if rec["task"] == "classification":
        labels = rec.get("labels") or []
        if not labels:
            raise FtcliError("the adapter does not record its labels (ftcli.json)", hint="merge an adapter ftcli trained")
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={lab: i for i, lab in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModelForCausalLM
    method = rec.get("method", {})
    if method.get("kind") == "qlora" and into == "dequantized":
        from transformers import BitsAndBytesConfig

        from ftcli.adapt import keep_4bit_trainable_on_cpu

        q = method.get("quantization") or {}
        if q.get("bits", 4) == 8:
            qc = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.get("quant_type", "nf4"),
                                    bnb_4bit_use_double_quant=q.get("double_quant", True),
                                    bnb_4bit_compute_dtype=torch.float32)
        model = cls.from_pretrained(model_dir, quantization_config=qc, device_map={"": "cpu"}, **kwargs)
        keep_4bit_trainable_on_cpu(model)
        model = model.dequantize(dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        model = cls.from_pretrained(model_dir, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def sample_batches(tokenizer, samples: list[dict] | None, limit: int = 16) -> list[dict]:
    """Tokenized inputs to compare on: the run's test examples, else built-in sentences."""
    import torch

    from ftcli.train import collate

    if samples:
        feats = [{"input_ids": f["input_ids"], "labels": 0} for f in samples[:limit]]
    else:
        enc = tokenizer(BUILTIN_SAMPLES, add_special_tokens=True)
        feats = [{"input_ids": ids, "labels": 0} for ids in enc["input_ids"]]
    batches = []
    for i in range(0, len(feats), 8):
        b = collate(feats[i : i + 8], tokenizer.pad_token_id)
        batches.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return batches or [{"input_ids": torch.tensor([[tokenizer.pad_token_id]]), "attention_mask": torch.tensor([[1]])}]


def logits_on(model, batches: list[dict], task: str) -> list:
    """Logits at real (non-pad) positions, per batch, in fp32."""
    import torch

    out = []
    with torch.no_grad():
        for b in batches:
            lg = model(**b).logits.float()
            if task != "classification":
                lg = lg[b["attention_mask"].bool()]
            out.append(lg)
    return out


def compare(reference: list, other: list) -> dict:
    import torch

    diff = max(float((a - b).abs().max()) for a, b in zip(reference, other, strict=True))
    scale = max(1.0, max(float(a.abs().max()) for a in reference))
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, other, strict=True)])
    return {"max_logit_diff": diff, "relative_diff": diff / scale, "prediction_agreement": float(agree.float().mean())}


def _model_card(rec: dict, result: dict, run_info: dict | None) -> str:
    lines = [
        "---", "library_name: transformers", f"base_model: {rec.get('base_model')}", "tags: [ftcli, lora, merged]", "---",
        "", f"# Merged {rec.get('method', {}).get('kind', 'lora')} fine-tune of `{rec.get('base_model')}`", "",
        "A plain transformers model: the LoRA update W = W0 + (alpha/r) B A is folded into the weights, so it",
        "loads with `AutoModelFor...from_pretrained` and runs with no adapter overhead. Made by `ftcli merge`.", "",
        "| | |", "|---|---|",
        f"| task | {rec.get('task')} |",
        f"| method | {rec.get('method', {}).get('kind')} r={rec['lora'].get('r')} alpha={rec['lora'].get('alpha')} on {rec['lora'].get('target_modules')} |",
        f"| merged into | {result['into']} weights, saved as {result['dtype']} |",
        f"| verification | max logit difference {result['max_logit_diff']:.2e} on {result['samples']} inputs "
        f"(tolerance {result['tolerance']:g} relative), prediction agreement {result['prediction_agreement']:.3f} |",
    ]
    if rec.get("labels"):
        lines.append(f"| labels | {', '.join(rec['labels'])} |")
    if run_info:
        params = run_info.get("params") or {}
        if params:
            lines.append(f"| trained parameters | {params.get('trainable', 0):,} of {params.get('total', 0):,} |")
        metrics = (run_info.get("eval") or {}).get("metrics") or {}
        for k, v in metrics.items():
            if isinstance(v, float):
                lines.append(f"| test {k} | {v:.4f} |")
    if rec.get("recipe"):
        lines += ["", "## Recipe", "", "```yaml", rec["recipe"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def merge(adapter: str | Path, out_dir: str | Path, *, base: str | None = None, dtype: str = "float32",
          into: str = "dequantized", samples: list[dict] | None = None, force: bool = False,
          compare_into: bool = True) -> Merged:
    """Merge the adapter in ``adapter`` (or a run folder) into its base and write ``out_dir``."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ftcli.adapt import torch_dtype

    t0 = time.perf_counter()
    adapter_dir = find_adapter(adapter)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FtcliError(f"{out_dir} already exists", hint="choose another folder, or pass --force to replace it")
    rec = adapter_record(adapter_dir)
    run_dir = adapter_dir.parent
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else None
    if (run_dir / "recipe.yaml").exists():
        rec["recipe"] = (run_dir / "recipe.yaml").read_text()
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model_dir = _base_dir(rec, base)
    is_qlora = rec.get("method", {}).get("kind") == "qlora"
    into = into if is_qlora else "original"
    batches = sample_batches(tok, samples)

    try:
        base_model = load_base(rec, model_dir, into, tok)
        model = PeftModel.from_pretrained(base_model, adapter_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        raise FtcliError(f"cannot load the base model and adapter together: {exc}",
                         hint="name the base the adapter was trained on with --base") from None
    model.eval()
    reference = logits_on(model, batches, rec["task"])

    other_into = None
    if is_qlora and compare_into:  # how far apart are "merge into dequantized" and "into original"?
        alt = PeftModel.from_pretrained(load_base(rec, model_dir, "original" if into == "dequantized" else "dequantized", tok),
                                        adapter_dir).eval()
        other_into = compare(reference, logits_on(alt, batches, rec["task"]))
        other_into["other"] = "original" if into == "dequantized" else "dequantized"
        del alt

    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    merged = model.merge_and_unload()
    merged = merged.to(torch_dtype(dtype))
    figures = compare(reference, logits_on(merged, batches, rec["task"]))
    tol = TOLERANCE[dtype]
    passed = figures["relative_diff"] <= tol

    result = {"into": into, "dtype": dtype, "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
              "tolerance": tol, **figures}
    if not passed:
        raise FtcliError(
            f"merge verification failed: merged logits differ from base + adapter by {figures['max_logit_diff']:.3g} "
            f"({figures['relative_diff']:.3g} relative, tolerance {tol:g} for {dtype}); nothing was written",
            hint="merge in float32 (--dtype float32), or check that --base is the model the adapter was trained on",
        )

    need = sum(p.numel() * p.element_size() for p in merged.parameters())
    free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else Path.cwd()).free
    if free < need * 1.1 + 50e6:
        raise FtcliError(f"not enough disk space for {out_dir}: needs about {human_bytes(need)}, {human_bytes(free)} free")

    with atomic_dir(out_dir) as tmp:
        if getattr(merged.config, "use_cache", None) is False:
            merged.config.use_cache = True
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        summary = Merged(str(out_dir), str(rec.get("base_model")), rec["task"], rec.get("method", {}).get("kind", "lora"),
                         into, dtype, result["samples"], figures["max_logit_diff"], figures["relative_diff"], tol,
                         figures["prediction_agreement"], passed, n_lora, other_into, written,
                         time.perf_counter() - t0)
        write_json(tmp / "merge.json", summary.as_dict())
        (tmp / "README.md").write_text(_model_card(rec, result, run_info), encoding="utf-8")
    return summary
