"""The model card (README.md) of a merged or exported folder."""

from __future__ import annotations

from ftcli.models import model_class_name
from ftcli.rundir import ExportRecord, MergeRecord, ModelRecord, RunRecord


def model_card(
    rec: ModelRecord,
    m: MergeRecord,
    run_info: RunRecord | None,
    base_params: int,
    recipe_text: str | None,
) -> str:
    """README.md of a merged folder: what it is, how it was checked, how to load it."""
    kind = rec.kind
    lora = rec.lora or {}
    sc = m.saved_check
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {rec.base_model}",
        f"tags: [ftcli, {kind}, {'merged' if kind != 'full' else 'fine-tuned'}]",
        "---",
        "",
        f"# {'Merged ' + kind if kind != 'full' else 'Fully'} fine-tuned `{rec.base_model}`",
        "",
    ]
    if kind == "full":
        lines += [
            "A plain transformers model: every weight was fine-tuned. It loads with `AutoModelFor...from_pretrained`",
            "and needs neither peft nor ftcli. Exported by `ftcli merge`.",
            "",
        ]
    else:
        lines += [
            "A plain transformers model: the LoRA update W = W0 + (alpha/r) B A is folded into the weights, so it",
            "loads with `AutoModelFor...from_pretrained`, needs neither peft nor ftcli, and runs with no adapter",
            "overhead. Made by `ftcli merge`.",
            "",
        ]
    lines += ["| | |", "|---|---|", f"| task | {rec.task} |"]
    if kind == "full":
        lines.append("| method | full fine-tuning |")
    else:
        lines.append(
            f"| method | {kind} r={lora.get('r')} alpha={lora.get('alpha')} "
            f"(scale {float(lora.get('alpha') or 0) / float(lora.get('r') or 1):g}) on {lora.get('target_modules')} |"
        )
        if m.saved_modules:
            lines.append(f"| trained in full and saved | {', '.join(m.saved_modules)} |")
        lines.append(
            f"| merged into | {m.into} weights{' (NF4, as training saw them)' if m.into == 'dequantized' else ''} |"
        )
    lines.append(f"| saved as | {m.dtype}, {m.parameters:,} parameters (base: {base_params:,}) |")
    if m.fold_check:
        fc = m.fold_check
        lines.append(
            f"| merge check (float32) | max logit difference {fc['max_logit_diff']:.2e} "
            f"({fc['relative_diff']:.1e} relative, tolerance {fc['tolerance']:g}), "
            f"predictions agree {fc['prediction_agreement']:.1%} |"
        )
    lines.append(
        f"| saved-folder check ({m.dtype}) | max logit difference {sc['max_logit_diff']:.2e} "
        f"({sc['relative_diff']:.1e} relative, tolerance {sc['tolerance']:g}), "
        f"predictions agree {sc['prediction_agreement']:.1%} on {m.samples} {m.sample_source} |"
    )
    if m.dequantized_vs_original:
        d = m.dequantized_vs_original
        lines.append(
            f"| merging into {d['other']} weights instead | would move logits by up to {d['max_logit_diff']:.3g} "
            f"({d['relative_diff']:.1e} relative), predictions agree {d['prediction_agreement']:.1%} |"
        )
    if rec.labels:
        lines.append(f"| labels | {', '.join(rec.labels)} |")
    if run_info:
        params = run_info.params
        if params:
            lines.append(
                f"| trained parameters | {params.get('trainable', 0):,} of {params.get('total', 0):,} |"
            )
        metrics = run_info.eval.get("metrics") or {}
        n = run_info.eval.get("n")
        for k, v in metrics.items():
            if isinstance(v, float):
                lines.append(f"| test {k} | {v:.4f}{f' ({n} examples)' if n else ''} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {model_class_name(rec.task)}, AutoTokenizer",
        "model = " + model_class_name(rec.task) + '.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
    ]
    if recipe_text:
        lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


EXPORTS_BEGIN = "<!-- ftcli export: begin -->"
EXPORTS_END = "<!-- ftcli export: end -->"


def with_exports(card: str, records: list[ExportRecord]) -> str:
    """``card`` with its GGUF export section replaced by one that lists ``records``: each file,
    its quantization and what the llama.cpp check measured against this folder."""
    if EXPORTS_BEGIN in card and EXPORTS_END in card:
        head, rest = card.split(EXPORTS_BEGIN, 1)
        card = head.rstrip("\n") + "\n" + rest.split(EXPORTS_END, 1)[1].lstrip("\n")
    if not records:
        return card
    lines = [
        EXPORTS_BEGIN,
        "## GGUF exports (llama.cpp, Ollama)",
        "",
        "Written by `ftcli export` and checked with llama.cpp's runtime against this folder in "
        "transformers (float32): tokenization of the test texts, the log-probability of each "
        "next token, greedy continuations, and the chat template's rendering.",
        "",
        "| file | quant | size | log-prob diff max / mean (tolerance) | greedy agreement "
        "| tokenization | chat template |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lp, g, t = r.logprob_check, r.greedy_check, r.template_check
        name = r.path.replace("\\", "/").rsplit("/", 1)[-1]
        lines.append(
            f"| {name}{' + Modelfile' if r.modelfile else ''} | {r.quant} | {r.bytes / 2**20:.1f} MiB "
            f"| {lp['max_abs_diff']:.3g} / {lp['mean_abs_diff']:.3g} nats "
            f"({lp['tolerance_max']:g} / {lp['tolerance_mean']:g}) over {lp['positions']} positions "
            f"| {g['agreement']:.1%} ({g['prompts']} prompts x {g['new_tokens']} tokens) "
            f"| {'identical' if r.tokenizer_check['passed'] else 'differs'} "
            f"| {('identical' if t.get('passed') else 'differs') if t.get('template') else 'none'} |"
        )
    lines += [
        "",
        f"Checked on {records[-1].sample_source} with llama-cpp-python {records[-1].llama_cpp}.",
        EXPORTS_END,
    ]
    return card.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
