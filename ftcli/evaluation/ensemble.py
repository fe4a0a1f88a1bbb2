"""``ftcli eval RUN_A RUN_B ... --ensemble``: average the members' probabilities.

Classification averages class probabilities. A causal LM averages each answer token's
probability over the members (they must share a tokenizer), which gives the ensemble's completion
loss; no answers are generated for an ensemble. The report puts the ensemble beside each member
and tests it against the best single member with the same paired statistics as ``--baseline``.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from ftcli.errors import FtcliError
from ftcli.evaluation import stats
from ftcli.evaluation.compare import RESAMPLES, analyse
from ftcli.evaluation.metrics import classification_report, lm_summary
from ftcli.evaluation.overfit import detect_overfitting
from ftcli.evaluation.report import jsonable, print_report, write_report
from ftcli.evaluation.score import Scored, tokenize_aligned
from ftcli.forward import class_probabilities, token_logprobs
from ftcli.models import load_trained, resolve_device, to_device
from ftcli.rundir import check_same_test, open_run
from ftcli.ui import UI
from ftcli.util import read_jsonl


def average_probs(members: list[list[list[float]]]) -> list[list[float]]:
    """The mean of the members' class probabilities, example by example."""
    return np.mean(np.asarray(members, dtype=float), axis=0).tolist()


def ensemble_loss_sums(members: list[list[list[float]]]) -> list[float]:
    """Per-example summed loss of the ensemble: -sum_t log(mean_m p_m(token t))."""
    out = []
    for per_member in zip(*members, strict=True):
        lp = np.asarray(per_member, dtype=float)  # members x tokens
        out.append(float(-(logsumexp(lp, axis=0) - math.log(lp.shape[0])).sum()))
    return out


def eval_ensemble(
    run_dirs: list[Path],
    ui: UI,
    out_dir: Path | None = None,
    n_resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:

    rds = [open_run(d) for d in run_dirs]
    if len({rd.run_dir.resolve() for rd in rds}) < len(rds):
        raise FtcliError("the same run is named twice", hint="an ensemble needs different runs")
    for other in rds[1:]:
        check_same_test(rds[0], other)
    task = rds[0].recipe.task
    device = resolve_device("auto")
    members: list[Scored] = []
    raw: list = []
    ref_feats = ref_kept = ref_tok = None
    for rd in rds:
        ui.step(f"score member {rd.run_dir}")
        model, tok = load_trained(rd.run_dir, rd.recipe.task)
        to_device(model, device)
        feats, kept = tokenize_aligned(rd.examples, rd.recipe, tok, rd.prepared.label2id)
        if ref_feats is None:
            ref_feats, ref_kept, ref_tok = feats, kept, tok
        elif task == "causal_lm" and (
            [f["input_ids"] for f in feats] != [f["input_ids"] for f in ref_feats]
            or kept != ref_kept
        ):
            raise FtcliError(
                f"{rd.run_dir} tokenizes the test examples differently from {rds[0].run_dir}",
                hint="a causal-LM ensemble needs members with the same tokenizer and data.max_length",
            )
        if task == "classification":
            probs = class_probabilities(
                model, feats, tok.pad_token_id, rd.recipe.eval.batch_size, device
            )
            members.append(Scored(rd.run_dir.name, task, probs=probs))
            raw.append(probs)
        else:
            lps = token_logprobs(model, feats, tok.pad_token_id, rd.recipe.eval.batch_size, device)
            members.append(
                Scored(
                    rd.run_dir.name,
                    task,
                    loss_sums=[-sum(x) for x in lps],
                    tokens=[len(x) for x in lps],
                )
            )
            raw.append(lps)
        del model
        gc.collect()
    rd0 = rds[0]
    if task == "classification":
        ens = Scored("ensemble", task, probs=average_probs(raw))
        y = [f["labels"] for f in ref_feats]
        member_metrics = [classification_report(y, m.probs, rd0.prepared.labels) for m in members]
        key, better = "accuracy", max
    else:
        ens = Scored("ensemble", task, loss_sums=ensemble_loss_sums(raw), tokens=members[0].tokens)
        member_metrics = [lm_summary(m.loss_sums, m.tokens) for m in members]
        key, better = "completion_loss", min
    best_i = better(range(len(members)), key=lambda i: member_metrics[i][key])
    best = members[best_i]
    ui.step(f"paired statistics: the ensemble vs its best member ({best.name})")
    result = analyse(rd0, ref_feats, ref_kept, ens, best, n_resamples, seed, ref_tok)
    overfit = [detect_overfitting(read_jsonl(rd.run_dir / "metrics.jsonl")) for rd in rds]
    report = {
        "ftcli_eval": 1,
        "run": ", ".join(str(rd.run_dir) for rd in rds),
        "name": f"ensemble of {len(rds)} runs",
        "task": task,
        "method": "ensemble (mean of probabilities)",
        "model": rd0.recipe.model.name,
        "tuned_name": "ensemble",
        "baseline": {
            "kind": "member",
            "name": best.name,
            "description": f"the best single member by {key} ({rds[best_i].run_dir})",
        },
        "members": [
            {"run": str(rd.run_dir), "name": m.name, "metrics": mm}
            for rd, m, mm in zip(rds, members, member_metrics, strict=True)
        ],
        "test_examples": len(rd0.examples),
        "alpha": stats.ALPHA,
        "resamples": n_resamples,
        "seed": seed,
        **{k: v for k, v in result.items() if k != "predictions"},
        "overfitting": {
            "overfitting": any(o["overfitting"] for o in overfit),
            "message": " ".join(
                f"{rd.run_dir.name}: {o['message']}" for rd, o in zip(rds, overfit, strict=True)
            ),
        },
        "curves": {},
        "robustness": {"applies": False, "why": "not run for ensembles"},
        "stress": [],
    }
    out = Path(out_dir) if out_dir else rd0.run_dir / "eval-ensemble"
    report["files"] = write_report(report, result["predictions"], out)
    print_report(report, ui)
    return jsonable(report)
