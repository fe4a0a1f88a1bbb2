"""``ftcli eval RUN --baseline`` for task preference and reward runs: is the tuned model better
than the one it started from?

- Preference accuracy on the sealed test pairs, paired per pair (McNemar's exact test, the
  bootstrap interval of the difference): the tuned policy ranks chosen above rejected by its
  implicit reward (beta times the policy-reference log-ratio for DPO, IPO and KTO; IPO's per
  token, as its loss reads it; the length-normalised log-prob for SimPO and ORPO, which have no
  reference), the start model by its own log-prob (length-normalised the same way where the
  loss is). A reward model ranks by its score, its start is the untrained head it began with.
- With ``--judge JUDGE_RUN``: start and tuned answer the test prompts (greedy), a judge scores
  both answers (a task reward run's score, or a classifier's P(``--judge-label``)); the paired win
  rate (ties count half) with its bootstrap interval and a sign test, the judge's mean score (and
  positive rate for a classifier) paired, and the tuned model's mean per-token KL from the
  reference on its own answers (exact over the vocabulary at each answer position).
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ftcli.data.pairs import pairs_batch, wants_kto
from ftcli.data.tokenize import render_chat
from ftcli.errors import FtcliError
from ftcli.evaluation import stats
from ftcli.evaluation.metrics import Headline
from ftcli.evaluation.overfit import detect_overfitting
from ftcli.evaluation.report import jsonable, print_report, write_report
from ftcli.evaluation.score import tokenize_aligned
from ftcli.forward import generate_answers, inference_autocast
from ftcli.models import (
    load_recipe_base,
    load_reference,
    load_tokenizer,
    load_trained,
    resolve_device,
    to_device,
)
from ftcli.rundir import RunDir, open_run
from ftcli.train.objectives import collate_pairs, pair_logps, pair_rewards, reference_mode
from ftcli.ui import UI
from ftcli.util import read_jsonl

JUDGE_TASKS = ("reward", "classification")
SNIP = 200


def _snip(x) -> str:
    t = x if isinstance(x, str) else " / ".join(m.get("content", "") for m in x or [])
    return t if len(t) <= SNIP else t[: SNIP - 1] + "…"


# --------------------------------------------------------------------------- the figures


def accuracy_headline(start_correct, tuned_correct) -> Headline:
    """Preference accuracy as a paired 0/1 outcome per pair: McNemar's test and the interval."""
    table = np.concatenate([np.asarray(start_correct, float), np.asarray(tuned_correct, float)])
    return Headline(
        "preference_accuracy",
        lambda rows, pos: table[rows].mean(axis=-1),
        +1,
        "mcnemar",
        table,
        len(start_correct),
    )


def score_headlines(start_scores, tuned_scores, positive: bool) -> list[Headline]:
    """The judge's mean score (paired permutation test) and, for a classifier judge, its positive
    rate (P(label) > 0.5, McNemar), start vs tuned on the same prompts."""
    s = np.concatenate([np.asarray(start_scores, float), np.asarray(tuned_scores, float)])
    n = len(start_scores)
    out = [Headline("judge_score", lambda rows, pos: s[rows].mean(axis=-1), +1, "permutation", n=n)]
    if positive:
        b = (s > 0.5).astype(float)
        out.append(
            Headline(
                "judge_positive_rate", lambda rows, pos: b[rows].mean(axis=-1), +1, "mcnemar", b, n
            )
        )
    return out


def win_rate(start_scores, tuned_scores, n_resamples: int = 9999, seed: int = 0) -> dict:
    """How often the tuned answer scores above the start's on the same prompt (a tie counts
    half): the rate, its paired-bootstrap 95% interval as a difference from 0.5 (no preference),
    and the exact sign test on the untied prompts."""
    from scipy.stats import binomtest

    s, t = np.asarray(start_scores, float), np.asarray(tuned_scores, float)
    n = len(s)
    wins, losses = int((t > s).sum()), int((t < s).sum())
    outcome = np.where(t > s, 1.0, np.where(t < s, 0.0, 0.5))
    rate = float(outcome.mean()) if n else float("nan")
    row = {
        "metric": "win_rate",
        "n": n,
        "baseline": 0.5,
        "tuned": rate,
        "diff": rate - 0.5,
        "better": +1,
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "test": "sign test (exact)",
    }
    if n < 2:
        return {
            **row,
            "ci_low": float("nan"),
            "ci_high": float("nan"),
            "p_value": float("nan"),
            "verdict": stats.NEUTRAL,
        }
    table = np.concatenate([np.full(n, 0.5), outcome])
    h = Headline("win_rate", lambda rows, pos: table[rows].mean(axis=-1), +1, "permutation", n=n)
    low, high = stats.paired_bootstrap(h, n_resamples, seed=seed)
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    row.update(ci_low=low, ci_high=high, p_value=float(p))
    row["verdict"] = stats.verdict(row["diff"], low, high, row["p_value"], +1)
    return row


def implicit_margins(loss: str, beta: float, c, r, cn, rn, ref_c=None, ref_r=None) -> np.ndarray:
    """chosen minus rejected by the loss's own reward: beta times the log-ratio (DPO, KTO), the
    per-token log-ratio (IPO), the per-token log-prob (SimPO, ORPO); without a reference (the
    start model), the log-prob, per token where the loss normalises by length."""
    per_token = loss in ("ipo", "simpo", "orpo")
    if ref_c is not None and loss not in ("simpo", "orpo"):
        c, r = c - ref_c, r - ref_r
    if per_token:
        return c / np.maximum(cn, 1) - r / np.maximum(rn, 1)
    return (beta if ref_c is not None else 1.0) * (c - r)


# --------------------------------------------------------------------------- models


class Side:
    """A model as one side of the comparison: ``off`` runs it with its adapter disabled (the
    start of an adapter run: the same weights, no second copy)."""

    def __init__(self, model, off: bool = False):
        self.model, self.off = model, off

    def use(self):
        return self.model.disable_adapter() if self.off else nullcontext()


def _no_reference_recipe(recipe):
    p = recipe.preference.model_copy(update={"reference": "start"})
    return recipe.model_copy(update={"preference": p})


def load_sides(rd: RunDir, device: str) -> tuple[Side, Side, Side, object, dict]:
    """(tuned, start, reference, tokenizer, what each is) of a preference run: the start with the
    adapter disabled for an adapter run, else loaded as the run loaded it; the reference as the
    run used it (the start for SimPO and ORPO, whose KL is measured from the start)."""
    r = rd.recipe
    model, tok = load_trained(rd.run_dir, "causal_lm")
    to_device(model, device)
    tuned = Side(model)
    _, _, folder = load_tokenizer(r.model)
    if r.method.kind != "full" and hasattr(model, "disable_adapter"):
        start = Side(model, off=True)
        how = "the same weights with the adapter disabled"
    else:
        start = Side(load_reference(_no_reference_recipe(r), folder, tok, device))
        how = "loaded as the run loaded it"
    mode = reference_mode(r)
    p = r.preference
    if mode == "model" and p.reference != "start":
        ref = Side(load_reference(r, folder, tok, device))
        ref_what = f"preference.reference {p.reference}"
    else:
        ref = start
        ref_what = "the start model" + ("" if mode else f" ({p.loss} trains without a reference)")
    what = {
        "start": f"{r.model.name}, the model the run started from ({how})",
        "reference": ref_what,
    }
    return tuned, start, ref, tok, what


def pair_sums(side: Side, feats: list[dict], pad_id: int, batch_size: int, device, reward=False):
    """Per pair: (chosen, rejected, chosen tokens, rejected tokens) as float arrays; a reward
    model's scores (and ones) with ``reward``."""
    out = [[], [], [], []]
    m = side.model
    m.eval()
    with torch.no_grad(), side.use(), inference_autocast(m, device):
        for s in range(0, len(feats), batch_size):
            b = {
                k: v.to(device) for k, v in collate_pairs(feats[s : s + batch_size], pad_id).items()
            }
            if reward:
                c, r = pair_rewards(m, b)
                parts = (c, r, torch.ones_like(c), torch.ones_like(r))
            else:
                parts = pair_logps(m, b)
            for o, x in zip(out, parts, strict=True):
                o.extend(x.float().cpu().tolist())
    return tuple(np.asarray(o, float) for o in out)


def test_pairs(rd: RunDir, tok) -> tuple[list[dict], list[dict]]:
    """The sealed test pairs (KTO's unpaired rows have no pair to rank) and their features, as
    the run tokenized them (a KTO run's pairs tokenized as pairs)."""
    r = rd.recipe
    examples = [e for e in rd.examples if e.get("chosen") is not None]
    if not examples:
        raise FtcliError(
            f"{rd.run_dir}'s test split holds no chosen/rejected pairs (only unpaired KTO rows)",
            hint="preference accuracy ranks pairs: give the run paired data",
        )
    if wants_kto(r):
        r = r.model_copy(update={"preference": r.preference.model_copy(update={"loss": "dpo"})})
    feats, kept = tokenize_aligned(examples, r, tok, None)
    return [examples[i] for i in kept], feats


# --------------------------------------------------------------------------- the judge


def check_judge(judge: Path | None, label: str | None) -> RunDir | None:
    """The judge run, checked before any model loads: a task reward run, or a classification run
    with ``label`` one of its labels."""
    if judge is None:
        if label is not None:
            raise FtcliError("--judge-label applies with --judge", hint="add --judge RUN_DIR")
        return None
    jd = open_run(Path(judge))
    task = jd.recipe.task
    if task not in JUDGE_TASKS:
        raise FtcliError(
            f"--judge {judge} is a task {task} run: a judge is a task reward run or a "
            "classification run",
            hint="train a reward model (task: reward) or a classifier with a positive label",
        )
    if task == "classification":
        labels = jd.prepared.labels or []
        if label is None or label not in labels:
            what = "names none" if label is None else f"names {label!r}, not one of them"
            raise FtcliError(
                f"--judge {judge} is a classifier (labels {', '.join(labels)}): --judge-label {what}",
                hint=f"e.g. --judge-label {labels[-1] if labels else 'positive'}",
            )
    elif label is not None:
        raise FtcliError(
            f"--judge-label {label}: the judge {judge} is a reward model (one score, no labels)",
            hint="drop --judge-label",
        )
    return jd


def _join(prompt, answer: str) -> str:
    """A text prompt continued by its answer (one space between them where neither has one)."""
    if not prompt or prompt[-1].isspace() or answer[:1].isspace():
        return prompt + answer
    return prompt + " " + answer


def judge_scores(jd: RunDir, label: str | None, prompts: list, answers: list[str], device) -> list:
    """The judge's score of each (prompt, answer): a reward model's score of the pair as it was
    trained to read one; a classifier's P(label) of the prompt continued by the answer (the answer
    alone after a conversation: the classifier reads no chat markup)."""
    if jd.recipe.task == "classification":
        from ftcli.serve.predictor import load_predictor

        pred = load_predictor(str(jd.run_dir))
        texts = [
            _join(p, a) if isinstance(p, str) else a for p, a in zip(prompts, answers, strict=True)
        ]
        rows = pred.classify(texts, jd.recipe.eval.batch_size)
        del pred
        gc.collect()
        return [row["probs"][label] for row in rows]
    model, tok = load_trained(jd.run_dir, "reward")
    to_device(model, device)
    spaced = [
        _join(p, a)[len(p) :] if isinstance(p, str) else a
        for p, a in zip(prompts, answers, strict=True)
    ]
    batch = {
        "prompt": [p if isinstance(p, str) else None for p in prompts],
        "prompt_messages": [p if isinstance(p, list) else None for p in prompts],
        "chosen": spaced,
        "rejected": spaced,
    }
    f = pairs_batch(
        batch,
        tokenizer=tok,
        render=render_chat,
        L=jd.recipe.data.max_length,
        add_eos=jd.recipe.data.add_eos,
        kto=False,
    )
    feats = []
    for i, keep in enumerate(f["keep"]):
        if keep:
            ids, labels = f["chosen_input_ids"][i], f["chosen_labels"][i]
        else:  # the answer cut away entirely: the judge reads the prompt as it fits
            text = prompts[i] if isinstance(prompts[i], str) else render_chat(tok, prompts[i], True)
            ids = tok(text, add_special_tokens=True)["input_ids"][: jd.recipe.data.max_length]
            ids = ids or [tok.eos_token_id]
            labels = list(ids)
        feats.append(
            {
                "chosen_input_ids": ids,
                "chosen_labels": labels,
                "rejected_input_ids": ids,
                "rejected_labels": labels,
            }
        )
    c, _, _, _ = pair_sums(
        Side(model), feats, tok.pad_token_id, jd.recipe.eval.batch_size, device, True
    )
    del model
    gc.collect()
    return c.tolist()


def judge_description(jd: RunDir, label: str | None) -> str:
    if jd.recipe.task == "reward":
        return f"the reward model {jd.run_dir} (its score)"
    return f"the classifier {jd.run_dir}: P({label}) of the prompt continued by the answer"


# --------------------------------------------------------------------------- generation and KL


def _prompt_text(tok, p) -> tuple[str, bool]:
    """(text to generate from, add_special_tokens), as the pairs were tokenized."""
    return (p, True) if isinstance(p, str) else (render_chat(tok, p, True), False)


def answer(side: Side, tok, prompts: list, max_new_tokens: int, batch_size: int, device, L: int):
    """Greedy answers of one side, prompts grouped by how they are tokenized."""
    out: list = [None] * len(prompts)
    parts = [_prompt_text(tok, p) for p in prompts]
    with side.use():
        for special in (True, False):
            at = [i for i, (_, s) in enumerate(parts) if s is special]
            if not at:
                continue
            got = generate_answers(
                side.model,
                tok,
                [parts[i][0] for i in at],
                special,
                max_new_tokens,
                batch_size,
                device,
                L,
                keep_ids=True,
            )
            for i, g in zip(at, got, strict=True):
                out[i] = g
    return out


def _answer_logprobs(side: Side, seqs: list[list[int]], starts: list[int], device):
    """Log-softmax over the vocabulary at each answer position of each sequence (float32)."""
    pad = 0
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad(), side.use(), inference_autocast(side.model, device):
        logits = side.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return [
        torch.log_softmax(logits[i, st - 1 : len(s) - 1].float(), dim=-1)
        for i, (s, st) in enumerate(zip(seqs, starts, strict=True))
    ]


def answer_kl(tuned: Side, ref: Side, answers: list[dict], batch_size: int, device) -> dict:
    """The tuned model's KL from the reference at each position of its own answers:
    sum over the vocabulary of pi (log pi - log ref), per answer token; the token-weighted mean
    and the mean of the per-answer means."""
    rows = [a for a in answers if a["ids"]]
    per_answer, total, count = [], 0.0, 0
    tuned.model.eval()
    ref.model.eval()
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        seqs = [a["prompt_ids"] + a["ids"] for a in chunk]
        starts = [len(a["prompt_ids"]) for a in chunk]
        lp = _answer_logprobs(tuned, seqs, starts, device)
        lq = _answer_logprobs(ref, seqs, starts, device)
        for p, q in zip(lp, lq, strict=True):
            kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)
            per_answer.append(float(kl.mean()))
            total += float(kl.sum())
            count += kl.shape[0]
    return {
        "kl_per_token": total / count if count else float("nan"),
        "kl_per_answer_mean": float(np.mean(per_answer)) if per_answer else float("nan"),
        "answers": len(rows),
        "tokens": count,
    }


def generated(rd: RunDir, tuned: Side, start: Side, ref: Side, tok, prompts, max_new, device):
    """Start and tuned answer the prompts; the judge scores both; the tuned answers' KL."""
    r = rd.recipe
    bs, L = r.eval.batch_size, r.data.max_length
    a_start = answer(start, tok, prompts, max_new, bs, device, L)
    a_tuned = answer(tuned, tok, prompts, max_new, bs, device, L)
    kl = answer_kl(tuned, ref, a_tuned, bs, device)
    return a_start, a_tuned, kl


# --------------------------------------------------------------------------- the report


def _failures(examples, start_ok, tuned_ok, start_m, tuned_m) -> tuple[dict, list[dict]]:
    rows = []
    for i, e in enumerate(examples):
        rows.append(
            {
                "index": i,
                "prompt": e["prompt"],
                "chosen": e["chosen"],
                "rejected": e["rejected"],
                "baseline": {"margin": float(start_m[i]), "correct": bool(start_ok[i])},
                "tuned": {"margin": float(tuned_m[i]), "correct": bool(tuned_ok[i])},
            }
        )
    s, t = np.asarray(start_ok, bool), np.asarray(tuned_ok, bool)

    def table(mask, key):
        idx = sorted(np.flatnonzero(mask), key=key)[:10]
        return [
            {
                "index": int(i),
                "margin_baseline": float(start_m[i]),
                "margin_tuned": float(tuned_m[i]),
                "prompt": _snip(examples[i]["prompt"]),
                "chosen": _snip(examples[i]["chosen"]),
                "rejected": _snip(examples[i]["rejected"]),
            }
            for i in idx
        ]

    return {
        "counts": {
            "regressions": int((s & ~t).sum()),
            "fixed": int((~s & t).sum()),
            "both_wrong": int((~s & ~t).sum()),
        },
        "regressions": table(s & ~t, lambda i: tuned_m[i]),
        "persistent": table(~s & ~t, lambda i: tuned_m[i]),
        "by_length": [],
    }, rows


def eval_pairs_baseline(
    run_dir: Path,
    baselines: list[str],
    ui: UI,
    out_dir: Path | None = None,
    n_resamples: int = 9999,
    seed: int = 0,
    judge: Path | None = None,
    judge_label: str | None = None,
    max_new_tokens: int | None = None,
    prompts: int | None = None,
) -> dict:
    """``ftcli eval RUN --baseline`` of a preference or reward run: the tuned model vs its start
    on the sealed test pairs (and, with ``judge``, on generated answers); one report in
    RUN_DIR/eval/base/ as for every other baseline, and the index."""
    from ftcli.evaluation.summary import write_index

    rd = open_run(run_dir)
    task = rd.recipe.task
    bad = [b for b in baselines if b not in ("default", "base")]
    if bad:
        raise FtcliError(
            f"--baseline {bad[0]}: a task {task} run is compared with the model it started from",
            hint="ftcli eval RUN --baseline (the start model)",
        )
    if task == "reward" and (judge is not None or judge_label is not None):
        raise FtcliError(
            "--judge scores generated answers: a reward run generates none",
            hint="use the reward run itself as the judge of a preference run: --judge "
            + str(run_dir),
        )
    jd = check_judge(judge, judge_label)
    device = resolve_device("auto")
    r = rd.recipe
    ui.step(f"score the tuned model of {rd.run_dir} and its start on the sealed test pairs")
    extra: dict = {}
    if task == "reward":
        model, tok = load_trained(rd.run_dir, "reward")
        to_device(model, device)
        examples, feats = test_pairs(rd, tok)
        pad, bs = tok.pad_token_id, r.eval.batch_size
        tc, tr, _, _ = pair_sums(Side(model), feats, pad, bs, device, reward=True)
        del model
        gc.collect()
        base, note = _untrained_reward(rd, tok, device)
        sc, sr, _, _ = pair_sums(Side(base), feats, pad, bs, device, reward=True)
        del base
        gc.collect()
        start_m, tuned_m = sc - sr, tc - tr
        desc = note
        what = {"ranking": "by the reward model's score (chosen above rejected)"}
    else:
        tuned, start, ref, tok, what = load_sides(rd, device)
        examples, feats = test_pairs(rd, tok)
        pad, bs = tok.pad_token_id, r.eval.batch_size
        p = r.preference
        tc, tr, cn, rn = pair_sums(tuned, feats, pad, bs, device)
        sc, sr, _, _ = pair_sums(start, feats, pad, bs, device)
        if p.uses_reference:
            rc, rr = (sc, sr) if ref is start else pair_sums(ref, feats, pad, bs, device)[:2]
            tuned_m = implicit_margins(p.loss, p.beta_value, tc, tr, cn, rn, rc, rr)
        else:
            tuned_m = implicit_margins(p.loss, p.beta_value, tc, tr, cn, rn)
        start_m = implicit_margins(p.loss, p.beta_value, sc, sr, cn, rn)
        norm = " per token" if p.loss in ("ipo", "simpo", "orpo") else ""
        what["ranking"] = (
            f"tuned: {p.loss}'s implicit reward"
            + (
                f" (beta {p.beta_value:g} x log-ratio to the reference{norm})"
                if p.uses_reference and p.loss != "ipo"
                else ""
            )
            + (" (log-ratio to the reference per token)" if p.loss == "ipo" else "")
            + (" (log-prob per token)" if not p.uses_reference else "")
            + f"; start: its own log-prob{norm}"
        )
        desc = f"the start: {what['start']}"
        if jd is not None:
            uniq = list(dict.fromkeys(_key(e["prompt"]) for e in examples))
            by_key = {_key(e["prompt"]): e["prompt"] for e in examples}
            n = prompts if prompts is not None else r.eval.generate_examples
            chosen_prompts = [by_key[k] for k in uniq[:n]]
            mnt = max_new_tokens or r.eval.max_new_tokens
            ui.step(
                f"start and tuned answer {len(chosen_prompts)} held-out prompts (greedy, at most "
                f"{mnt} new tokens); the KL from the reference on the tuned answers"
            )
            a_s, a_t, kl = generated(rd, tuned, start, ref, tok, chosen_prompts, mnt, device)
        del tuned, start, ref
        gc.collect()
        if jd is not None:
            ui.step(f"the judge {jd.run_dir} scores both answers")
            s_sc = judge_scores(jd, judge_label, chosen_prompts, [a["answer"] for a in a_s], device)
            t_sc = judge_scores(jd, judge_label, chosen_prompts, [a["answer"] for a in a_t], device)
            extra["generation"] = {
                "judge": str(jd.run_dir),
                "judge_task": jd.recipe.task,
                "judge_label": judge_label,
                "judge_description": judge_description(jd, judge_label),
                "prompts": len(chosen_prompts),
                "max_new_tokens": mnt,
                "decoding": "greedy",
                "win_rate": win_rate(s_sc, t_sc, n_resamples, seed),
                "kl": {**kl, "from": what["reference"]},
                "mean_answer_tokens": {
                    "baseline": float(np.mean([a["tokens"] for a in a_s])) if a_s else float("nan"),
                    "tuned": float(np.mean([a["tokens"] for a in a_t])) if a_t else float("nan"),
                },
            }
            extra["generation_significance"] = [
                stats.compare(h, n_resamples, seed)
                for h in score_headlines(s_sc, t_sc, jd.recipe.task == "classification")
            ]
            extra["answers"] = [
                {
                    "prompt": pr,
                    "baseline": {"answer": a["answer"], "score": s},
                    "tuned": {"answer": b["answer"], "score": t},
                }
                for pr, a, b, s, t in zip(chosen_prompts, a_s, a_t, s_sc, t_sc, strict=True)
            ]
    start_ok, tuned_ok = start_m > 0, tuned_m > 0
    ui.step(f"paired statistics vs the start ({n_resamples} resamples)")
    significance = [stats.compare(accuracy_headline(start_ok, tuned_ok), n_resamples, seed)]
    gen = extra.get("generation")
    if gen:
        significance += [gen["win_rate"], *extra.pop("generation_significance")]
    top = significance[0]
    failures, predictions = _failures(examples, start_ok, tuned_ok, start_m, tuned_m)
    for row, ans in zip(predictions, extra.pop("answers", []), strict=False):
        row["generated"] = ans
    info = {"kind": "base", "name": "start", "description": desc}
    curves = read_jsonl(rd.run_dir / "metrics.jsonl")
    metrics = {
        side: {
            "preference_accuracy": float(np.mean(ok)),
            "mean_margin": float(np.mean(m)),
            "pairs": len(ok),
        }
        for side, ok, m in (("baseline", start_ok, start_m), ("tuned", tuned_ok, tuned_m))
    }
    if gen:
        for s in significance[1:]:
            metrics["baseline"][s["metric"]] = s["baseline"]
            metrics["tuned"][s["metric"]] = s["tuned"]
        metrics["tuned"]["kl_per_token"] = gen["kl"]["kl_per_token"]
    report = {
        "ftcli_eval": 1,
        "run": str(rd.run_dir),
        "name": r.name,
        "task": task,
        "method": r.method.kind,
        "model": r.model.name,
        "baseline": info,
        "tuned_name": "tuned",
        "test_examples": len(rd.examples),
        "alpha": stats.ALPHA,
        "resamples": n_resamples,
        "seed": seed,
        "metrics": metrics,
        "significance": significance,
        "primary_metric": "preference_accuracy",
        "verdict": top["verdict"],
        "verdict_text": stats.verdict_text(top, "start"),
        "failures": failures,
        "examples_scored": len(feats),
        "preference": {"loss": r.preference.loss if task == "preference" else None, **what},
        "overfitting": detect_overfitting(curves),
        "curves": {
            "train": [[c["step"], c["loss"]] for c in curves if "loss" in c],
            "validation": [[c["step"], c["val_loss"]] for c in curves if "val_loss" in c],
        },
        "robustness": {"applies": False, "why": "not measured for pair tasks"},
        "stress": [],
        **extra,
    }
    root = Path(out_dir) if out_dir else rd.run_dir / "eval"
    report["files"] = write_report(report, predictions, root / "base")
    print_report(report, ui)
    index = write_index(root, ui)
    out = jsonable(report)
    out["index"] = index["files"]
    return out


def _key(prompt) -> str:
    import json

    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _untrained_reward(rd: RunDir, tok, device: str):
    """A reward run's start: the pre-trained body with the fresh one-logit head it began with
    (init/head.safetensors), else a head seeded with train.seed."""
    from safetensors.torch import load_file

    from ftcli.evaluation.baseline import INIT_HEAD, load_head

    r = rd.recipe
    _, _, folder = load_tokenizer(r.model)
    torch.manual_seed(r.train.seed)
    model = load_recipe_base(r, folder, None, tok, device)
    init = rd.run_dir / INIT_HEAD
    if init.is_file():
        load_head(model, load_file(str(init)))
        note = (
            "the pre-trained body with the untrained one-logit head this run started from "
            "(init/head.safetensors): chance level by design"
        )
    else:
        note = "the pre-trained body with a fresh head seeded with train.seed: chance level"
    return to_device(model, device).eval(), note
