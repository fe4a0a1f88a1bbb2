"""The comparison behind ``ftcli eval --baseline``: score both models on the same sealed test
examples, test the differences, find the failures, read the curves, write the report."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from ftcli.errors import FtcliError
from ftcli.evaluation import stats
from ftcli.evaluation.baseline import load_base, probe_probabilities
from ftcli.evaluation.failures import classification_failures, lm_failures
from ftcli.evaluation.metrics import (
    classification_headlines,
    classification_report,
    generation_headlines,
    lm_loss_headlines,
    lm_summary,
)
from ftcli.evaluation.overfit import detect_overfitting
from ftcli.evaluation.report import jsonable, print_report, write_report
from ftcli.evaluation.robustness import robustness, stress
from ftcli.evaluation.score import (
    Scored,
    answer_table,
    per_token_loss,
    prompt_parts,
    score_model,
    tokenize_aligned,
)
from ftcli.evaluation.stats import verdict_text
from ftcli.models import load_trained, resolve_device, to_device
from ftcli.rundir import RunDir, check_same_test, open_run
from ftcli.ui import UI
from ftcli.util import read_jsonl

RESAMPLES = 9999


def score_run(
    rd: RunDir, ui: UI, generate: bool = True, extra=None
) -> tuple[Scored, list[dict], list[int], object, dict]:
    """Load a run's fine-tuned model and score it; ``extra(model, tok, feats, kept, scored)`` runs
    while the model is loaded. Returns (scored, features, kept indices, tokenizer, extra's result)."""

    device = resolve_device("auto")
    model, tok = load_trained(rd.run_dir, rd.recipe.task)
    to_device(model, device)
    feats, kept = tokenize_aligned(rd.examples, rd.recipe, tok, rd.prepared.label2id)
    scored = score_model(
        rd.run_dir.name, rd.recipe, model, tok, rd.examples, feats, kept, device, generate
    )
    result = extra(model, tok, feats, kept, scored) if extra else {}
    del model
    gc.collect()
    return scored, feats, kept, tok, result


def robustness_extra(rd: RunDir, ui: UI, enabled: bool, seed: int):

    def run(model, tok, feats, kept, scored):
        if not enabled:
            return {
                "robustness": {"applies": False, "why": "skipped (--no-robustness)"},
                "stress": [],
            }
        device = resolve_device("auto")
        ex = [rd.examples[i] for i in kept]
        ui.step("robustness: perturbed test inputs, empty and very long inputs")
        if rd.recipe.task == "classification":
            m = classification_report(
                [f["labels"] for f in feats], scored.probs, rd.prepared.labels
            )
            clean = {"accuracy": m["accuracy"], "pred": np.asarray(scored.probs).argmax(1)}
        else:
            clean = lm_summary(scored.loss_sums, scored.tokens)
        return {
            "robustness": robustness(
                rd.recipe, model, tok, ex, rd.prepared.label2id, device, clean, seed
            ),
            "stress": stress(rd.recipe, model, tok, ex, rd.prepared.label2id, device),
        }

    return run


BASELINE_KINDS = ("base", "probe", "tfidf", "majority")
NEEDS_LABELS = ("probe", "tfidf", "majority")


def resolve_baselines(task: str, names: list[str]) -> list[str]:
    """``default`` is the fair bar of the task: the linear probe for classification, the base
    model for a causal LM. Each baseline once, in the order given."""
    out: list[str] = []
    for n in names:
        n = ("probe" if task == "classification" else "base") if n == "default" else n
        if n in NEEDS_LABELS and task != "classification":
            raise FtcliError(
                f"--baseline {n} applies to classification runs only",
                hint="for a causal LM use --baseline (the base model, zero-shot) or another run",
            )
        if n not in out:
            out.append(n)
    return out


def report_folder(info: dict) -> str:
    """The folder of one baseline's report inside eval/: base, probe, tfidf, majority, vs-<run>."""
    return f"vs-{info['name']}" if info["kind"] == "run" else info["kind"]


def _classic_baseline(rd: RunDir, baseline: str, ui: UI, kept: list[int]) -> tuple[Scored, dict]:
    from ftcli.evaluation import classic

    r, labels = rd.recipe, rd.prepared.labels
    train = rd.prepared.splits.get("train") or []
    test = [rd.examples[i] for i in kept]
    if baseline == "majority":
        ui.step("baseline: always the most frequent training label")
        probs, info = classic.majority_probabilities(train, len(test), labels)
        desc = (
            f"always {info['label']!r}, the most frequent label of the run's training split "
            f"({info['train_count']} of {info['train_examples']} examples); its probabilities are "
            "the training label frequencies"
        )
        return Scored("majority", r.task, probs=probs), {
            "kind": "majority",
            "name": "majority",
            "description": desc,
            "majority": info,
        }
    ui.step("baseline: TF-IDF + logistic regression on the run's training split")
    val = rd.prepared.splits.get("validation") or []
    probs, info = classic.tfidf_probabilities(
        train, val, [e["text"] for e in test], labels, r.train.seed
    )
    chosen = (
        f"C = {info['C']:g} chosen on the {info['validation_examples']} validation examples "
        f"(validation accuracy {info['validation_accuracy']:.4f})"
        if info["validation_accuracy"] is not None
        else f"C = {info['C']:g} (no validation split to choose it)"
    )
    desc = (
        f"TF-IDF ({info['features']}, {info['vocabulary']} terms) + logistic regression "
        f"(scikit-learn), trained on the run's {info['train_examples']} training examples, {chosen}: "
        "the classic non-neural bar"
    )
    return Scored("tfidf", r.task, probs=probs), {
        "kind": "tfidf",
        "name": "tfidf",
        "description": desc,
        "tfidf": info,
    }


def score_baseline(
    rd: RunDir, baseline: str, ui: UI, feats: list[dict], kept: list[int], tok
) -> tuple[Scored, dict]:
    """The baseline's per-example outputs and a description of what it is; ``tok`` is the run's tokenizer."""
    device = resolve_device("auto")
    r = rd.recipe
    if baseline in ("tfidf", "majority"):
        return _classic_baseline(rd, baseline, ui, kept)
    if baseline in ("base", "probe"):
        if baseline == "probe":
            ui.step("baseline: linear probe (base frozen, head trained on the train split)")
            model, _ = load_base(r, rd.run_dir, rd.prepared.labels, tok, device)
            to_device(model, device)
            split_feats = {
                s: tokenize_aligned(rd.prepared.splits[s], r, tok, rd.prepared.label2id)[0]
                for s in ("train", "validation")
                if rd.prepared.splits.get(s)
            }
            split_feats["test"] = feats
            total = sum(len(f) for f in split_feats.values())
            with ui.counter("probe: base features", total) as advance:
                probs, info = probe_probabilities(r, model, tok, split_feats, device, advance)
            del model
            gc.collect()
            desc = (
                f"a linear probe: {r.model.name} frozen, only its head trained on the run's {info['train_examples']} "
                f"training examples ({info['epochs']} epochs of AdamW at lr {info['lr']:g}, epoch "
                f"{info['chosen_epoch']} kept by {info['chosen_by']}, seed {info['seed']})"
            )
            return Scored("probe", r.task, probs=probs), {
                "kind": "probe",
                "name": "probe",
                "description": desc,
                "probe": info,
            }
        ui.step(f"baseline: the base model {r.model.name}")
        model, desc = load_base(r, rd.run_dir, rd.prepared.labels, tok, device)
        to_device(model, device)
        scored = score_model("base", r, model, tok, rd.examples, feats, kept, device)
        del model
        gc.collect()
        return scored, {"kind": "base", "name": "base", "description": desc}
    if not Path(baseline).exists():
        raise FtcliError(
            f"--baseline {baseline!r} is neither {'|'.join(BASELINE_KINDS)} nor a run folder",
            hint="e.g. --baseline probe --baseline tfidf, or --baseline runs/other",
        )
    other = open_run(Path(baseline))
    check_same_test(rd, other)
    ui.step(f"baseline: run {other.run_dir}")
    scored, _, kept2, _, _ = score_run(other, ui)
    if kept2 != kept:
        raise FtcliError(
            f"{other.run_dir} keeps different test examples after tokenization than {rd.run_dir}",
            hint="compare runs with the same data.max_length and tokenizer",
        )
    desc = f"the run {other.run_dir} ({other.recipe.method.kind} on {other.recipe.model.name})"
    return scored, {
        "kind": "run",
        "name": other.run_dir.name,
        "description": desc,
        "run": str(other.run_dir),
    }


# --------------------------------------------------------------------------- analysis


def analyse(
    rd: RunDir,
    feats: list[dict],
    kept: list[int],
    tuned: Scored,
    base: Scored,
    n_resamples: int,
    seed: int,
    tok=None,
) -> dict:
    """Metrics of both, paired significance, failures and per-example predictions; a causal LM's
    needs its tokenizer ``tok`` (to split prompts from references)."""

    r = rd.recipe
    examples = [rd.examples[i] for i in kept]
    lengths = [len(f["input_ids"]) for f in feats]
    if r.task == "classification":
        labels = rd.prepared.labels
        y = [f["labels"] for f in feats]
        metrics = {
            "baseline": classification_report(y, base.probs, labels),
            "tuned": classification_report(y, tuned.probs, labels),
        }
        heads = classification_headlines(y, base.probs, tuned.probs, len(labels))
        failures, rows = classification_failures(
            [e["text"] for e in examples], y, base.probs, tuned.probs, labels, lengths
        )
        primary = "accuracy"
    else:
        metrics = {
            "baseline": lm_summary(base.loss_sums, base.tokens),
            "tuned": lm_summary(tuned.loss_sums, tuned.tokens),
        }
        heads = lm_loss_headlines(base.loss_sums, tuned.loss_sums, tuned.tokens)
        refs, prompts = [], []
        for e in examples:
            p, ref, _ = prompt_parts(tok, e)
            prompts.append(p)
            refs.append(ref)
        tb = answer_table(base, refs) if tuned.answers else {}
        tt = answer_table(tuned, refs) if tuned.answers else {}
        if tuned.answers:
            heads += generation_headlines(tb, tt)
            for side, tab in (("baseline", tb), ("tuned", tt)):
                metrics[side].update(
                    {k: float(sum(v) / len(v)) for k, v in tab.items()},
                    generated=len(tab["exact_match"]),
                )
        failures, rows = lm_failures(
            prompts,
            refs,
            lengths,
            per_token_loss(base),
            per_token_loss(tuned),
            base.answers,
            tuned.answers,
            tb,
            tt,
        )
        primary = "completion_loss"
    significance = [stats.compare(h, n_resamples, seed) for h in heads]
    top = next(s for s in significance if s["metric"] == primary)
    return {
        "metrics": metrics,
        "significance": significance,
        "primary_metric": primary,
        "verdict": top["verdict"],
        "verdict_text": verdict_text(top, base.name),
        "failures": failures,
        "predictions": rows,
        "examples_scored": len(feats),
    }


# --------------------------------------------------------------------------- the command


def assemble(
    rd: RunDir,
    info: dict,
    result: dict,
    curves: list[dict],
    extra: dict,
    n_resamples: int,
    seed: int,
) -> dict:
    """The report's content (everything but the per-example predictions, which go to their own file)."""
    return {
        "ftcli_eval": 1,
        "run": str(rd.run_dir),
        "name": rd.recipe.name,
        "task": rd.recipe.task,
        "method": rd.recipe.method.kind,
        "model": rd.recipe.model.name,
        "baseline": info,
        "test_examples": len(rd.examples),
        "alpha": stats.ALPHA,
        "resamples": n_resamples,
        "seed": seed,
        **{k: v for k, v in result.items() if k != "predictions"},
        "overfitting": detect_overfitting(curves),
        "curves": {
            "train": [[c["step"], c["loss"]] for c in curves if "loss" in c],
            "validation": [[c["step"], c["val_loss"]] for c in curves if "val_loss" in c],
        },
        **extra,
    }


def majority_line(rd: RunDir, feats: list[dict]) -> dict:
    """The majority rate every classification report shows: the floor any model must clear."""
    from ftcli.evaluation.classic import majority_rate

    m = majority_rate(
        rd.prepared.splits.get("train") or [], [f["labels"] for f in feats], rd.prepared.label2id
    )
    return {**m, "label": rd.prepared.labels[m["label_id"]]}


def eval_baseline(
    run_dir: Path,
    baselines: list[str] | str,
    ui: UI,
    out_dir: Path | None = None,
    n_resamples: int = RESAMPLES,
    seed: int = 0,
    robust: bool = True,
    generation: dict | None = None,
) -> dict:
    """``ftcli eval RUN --baseline B [--baseline B2 ...]``: each comparison and its report in its own
    folder of ``out_dir`` (default RUN_DIR/eval: base/, probe/, tfidf/, majority/, vs-<run>/), and
    the index of every report there. Returns the report (one baseline) or the index (several).
    A preference or reward run is compared with its start (evaluation/preference.py);
    ``generation`` holds its --judge, --judge-label, --max-new-tokens and --prompts."""
    from ftcli.evaluation.summary import write_index

    rd = open_run(run_dir)
    given = {k: v for k, v in (generation or {}).items() if v is not None}
    if rd.recipe.task in ("preference", "reward"):
        from ftcli.evaluation.preference import eval_pairs_baseline

        names = [baselines] if isinstance(baselines, str) else baselines
        return eval_pairs_baseline(run_dir, names, ui, out_dir, n_resamples, seed, **given)
    if given:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise FtcliError(
            f"{flag} applies to task preference runs (answers of the start and the tuned model, "
            f"judged); {rd.run_dir} is a task {rd.recipe.task} run",
            hint="drop it",
        )
    names = resolve_baselines(
        rd.recipe.task, [baselines] if isinstance(baselines, str) else baselines
    )
    fitted = [n for n in names if n in ("probe", "tfidf", "majority")]
    if fitted and not rd.prepared.splits.get("train"):
        raise FtcliError(
            f"--baseline {', '.join(fitted)} fits on the run's training split, and {rd.run_dir} "
            "keeps none (data.streaming reads it while training)",
            hint="compare with --baseline base (the untouched model) or with another run's folder",
        )
    ui.step(
        f"score the fine-tuned model of {rd.run_dir} on {len(rd.examples)} sealed test examples"
    )
    tuned, feats, kept, tok, extra = score_run(rd, ui, extra=robustness_extra(rd, ui, robust, seed))
    tuned.name = "fine-tuned"
    curves = read_jsonl(rd.run_dir / "metrics.jsonl")
    root = Path(out_dir) if out_dir else rd.run_dir / "eval"
    reports = []
    for baseline in names:
        base, info = score_baseline(rd, baseline, ui, feats, kept, tok)
        ui.step(f"paired statistics vs {info['name']} ({n_resamples} resamples) and failures")
        result = analyse(rd, feats, kept, tuned, base, n_resamples, seed, tok)
        report = assemble(rd, info, result, curves, extra, n_resamples, seed)
        if rd.recipe.task == "classification" and rd.prepared.splits.get("train"):
            report["majority"] = majority_line(rd, feats)
        if info["kind"] == "run":
            report["baseline_overfitting"] = detect_overfitting(
                read_jsonl(Path(info["run"]) / "metrics.jsonl")
            )
        report["files"] = write_report(report, result["predictions"], root / report_folder(info))
        report["tracked_in"] = track_comparison(rd.run_dir, report)
        print_report(report, ui)
        reports.append(jsonable(report))
    index = write_index(root, ui)
    if len(reports) == 1:
        reports[0]["index"] = index["files"]
        return reports[0]
    return {**index, "comparisons": reports}


def track_comparison(run_dir: Path, report: dict) -> list[str]:
    """The comparison's figures added to the MLflow run the training opened (if it was tracked)."""
    from ftcli.rundir import read_run_record
    from ftcli.tracking import log_to_run

    record = read_run_record(run_dir)
    figures = {}
    for s in report["significance"]:
        for key in ("baseline", "tuned", "diff", "ci_low", "ci_high", "p_value"):
            figures[f"eval_{s['metric']}_{key}"] = s.get(key)
    return log_to_run(record.model_dump() if record else {}, figures)
