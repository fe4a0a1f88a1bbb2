"""The report of a comparison: a rich table in the terminal, and eval/report.json, report.md,
a self-contained report.html (plots inlined as PNG data, no external URL) and predictions.jsonl."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ftcli.evaluation.stats import fmt, fmt_p
from ftcli.ui import UI
from ftcli.util import atomic_dir

VERDICT_STYLE = {"improved": "green", "regressed": "red", "no significant change": "yellow"}


# --------------------------------------------------------------------------- terminal


def _ci(row: dict) -> str:
    if row.get("ci_low") is None or row["ci_low"] != row["ci_low"]:
        return "-"
    return f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"


LOWER_IS_BETTER = {"calibration_error", "completion_loss", "perplexity", "loss"}


def metric_label(name: str, better: int | None = None) -> str:
    """A metric's name as the report shows it: the direction said for those where lower is better."""
    lower = better < 0 if better is not None else name in LOWER_IS_BETTER
    return f"{name} (lower is better)" if lower else name


def significance_rows(report: dict) -> list[list[str]]:
    return [
        [
            metric_label(s["metric"], s.get("better")),
            fmt(s["baseline"]),
            fmt(s["tuned"]),
            f"{s['diff']:+.4f}",
            _ci(s),
            fmt_p(s.get("p_value")),
            s.get("test", "-"),
            s["verdict"],
        ]
        for s in report["significance"]
    ]


def terminal_rows(report: dict) -> list[list[str]]:
    """Compact rows for the terminal: difference and interval in one cell, the test abbreviated."""
    short = {"McNemar exact": "McNemar", "paired permutation": "perm."}
    return [
        [
            metric_label(s["metric"], s.get("better")),
            fmt(s["baseline"]),
            fmt(s["tuned"]),
            f"{s['diff']:+.4f} {_ci(s)}",
            f"{fmt_p(s.get('p_value'))} {short.get(s.get('test'), '')}".strip(),
            s["verdict"],
        ]
        for s in report["significance"]
    ]


def majority_text(report: dict) -> str:
    """The floor every classifier must clear: always answering the most frequent training label."""
    m = report["majority"]
    return (
        f"Majority rate: always answering {m['label']!r} (the most frequent training label, "
        f"{m['train_count']} of {m['train_examples']}) is right on {fmt(m['test_accuracy'])} of "
        "these test examples."
    )


def tuned_name(report: dict) -> str:
    return report.get("tuned_name", "fine-tuned")


def sig_headers(report: dict) -> list[str]:
    return [
        "metric",
        report["baseline"]["name"],
        tuned_name(report),
        "difference",
        "95% CI",
        "p",
        "test",
        "verdict",
    ]


def member_rows(report: dict) -> tuple[list[str], list[list]]:
    """Ensembles: each member's metrics beside the ensemble's."""
    keys = [k for k, v in report["metrics"]["tuned"].items() if isinstance(v, int | float)]
    rows = [[m["name"], *[fmt(m["metrics"].get(k)) for k in keys]] for m in report["members"]]
    rows.append([tuned_name(report), *[fmt(report["metrics"]["tuned"].get(k)) for k in keys]])
    return ["model", *keys], rows


def print_report(report: dict, ui: UI) -> None:
    """The terminal summary: the significance table, the verdict, warnings, files."""
    from rich.table import Table

    if not ui.enabled:
        return
    c = ui.console
    b = report["baseline"]
    if report.get("members"):
        h, rows = member_rows(report)
        ui.table(f"{report['name']}: members and ensemble", rows, headers=h)
    t = Table(
        title=f"{report['name']}: {tuned_name(report)} vs {b['name']} on {report['examples_scored']} sealed "
        "test examples",
        title_justify="left",
    )
    heads = ["metric", b["name"], tuned_name(report), "difference [95% CI]", "p (test)", "verdict"]
    for i, h in enumerate(heads):
        t.add_column(h, justify="left" if i in (0, 5) else "right", no_wrap=i < 5)
    for row in terminal_rows(report):
        style = VERDICT_STYLE.get(row[-1])
        row[-1] = f"[{style}]{row[-1]}[/]" if style else row[-1]
        t.add_row(*row)
    width = c.width
    if not c.is_terminal:  # a log or a pipe: do not squeeze the numbers into 80 columns
        c.width = max(width, 130)
    try:
        c.print(t)
    finally:
        c.width = width
    ui.info(f"baseline: {b['description']}")
    if report.get("majority"):
        ui.info(majority_text(report))
    style = VERDICT_STYLE.get(report["verdict"], "bold")
    ui.info(f"[bold {style}]verdict[/] {report['verdict_text']}")
    for line in generation_lines(report):
        ui.info(line)
    ov = report["overfitting"]
    ui.info(("[bold red]warning[/] " if ov["overfitting"] else "") + ov["message"])
    f = report["failures"]["counts"]
    ui.info("failures: " + ", ".join(f"{k} {v}" for k, v in f.items()))
    bad = [s for s in report.get("stress", []) if not s["ok"]]
    for s in bad:
        ui.info(f"[bold red]stress failed[/] {s['case']}: {s['result']}")
    ui.info("report: " + ", ".join(str(p) for p in report["files"].values()))


# --------------------------------------------------------------------------- plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tick(label: str, width: int = 14) -> str:
    """A class name as a tick label: wrapped on two lines at most, so ticks neither collide nor clip."""
    import textwrap

    lines = textwrap.wrap(str(label), width) or [str(label)]
    return "\n".join(lines[:2]) + ("..." if len(lines) > 2 else "")


def plots(report: dict) -> dict[str, str]:
    """name -> base64 PNG, for every plot the report's data supports."""
    return {name: _png(fig) for name, fig in figures(report).items()}


def figures(report: dict) -> dict:
    """name -> matplotlib figure, laid out by matplotlib's constrained layout (titles, axis labels
    and ticks kept apart, nothing outside the canvas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out: dict = {}
    base_name = report["baseline"]["name"]
    cv = report.get("curves", {})
    if cv.get("train") or cv.get("validation"):
        fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
        if cv.get("train"):
            s, v = zip(*cv["train"], strict=True)
            ax.plot(s, v, label="training loss", color="#1f77b4")
        if cv.get("validation"):
            s, v = zip(*cv["validation"], strict=True)
            ax.plot(s, v, "o-", label="validation loss", color="#d62728")
        ov = report.get("overfitting", {})
        if ov.get("early_stopping_step") is not None:
            ax.axvline(
                ov["early_stopping_step"],
                color="gray",
                ls="--",
                lw=1,
                label="early stopping would keep",
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.set_title("Loss curves")
        out["curves"] = fig
    m = report["metrics"]
    if report["task"] == "classification":
        labels = list(m["tuned"]["per_class"])
        ticks = [_tick(k) for k in labels]
        side = max(3.6, 0.45 * len(labels) + 2.4)
        fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side + 0.8), layout="constrained")
        for k, (ax, which, title) in enumerate(
            ((axes[0], "baseline", base_name), (axes[1], "tuned", tuned_name(report)))
        ):
            cm = np.asarray(m[which]["confusion_matrix"])
            ax.imshow(cm, cmap="Blues")
            for (i, j), v in np.ndenumerate(cm):
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    color="white" if v > cm.max() / 2 else "black",
                )
            ax.set_xticks(
                range(len(labels)), ticks, rotation=45, ha="right", rotation_mode="anchor"
            )
            ax.set_yticks(range(len(labels)), ticks if k == 0 else [""] * len(labels))
            ax.set_xlabel("predicted label")
            if k == 0:  # one "true label" axis for both: the right panel's would sit on the left's
                ax.set_ylabel("true label")
            ax.set_title(title)
        fig.suptitle("Confusion matrices")
        out["confusion"] = fig
        fig, axes = plt.subplots(
            1, 3, figsize=(max(11, 1.1 * len(labels) * 3), 4.2), sharey=True, layout="constrained"
        )
        x = np.arange(len(labels))
        for ax, key in zip(axes, ("precision", "recall", "f1"), strict=True):
            ax.bar(
                x - 0.2,
                [m["baseline"]["per_class"][k][key] for k in labels],
                0.4,
                label=base_name,
                color="#aaaaaa",
            )
            ax.bar(
                x + 0.2,
                [m["tuned"]["per_class"][k][key] for k in labels],
                0.4,
                label=tuned_name(report),
                color="#1f77b4",
            )
            ax.set_xticks(x, ticks, rotation=45, ha="right", rotation_mode="anchor")
            ax.set_title(key)
            ax.set_ylim(0, 1.05)
        fig.legend(
            *axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False
        )
        fig.suptitle("Per-class precision, recall and F1")
        out["per_class"] = fig
    sig = [
        s
        for s in report["significance"]
        if s.get("ci_low") == s.get("ci_low") and s.get("ci_low") is not None
    ]
    if sig:
        fig, axes = plt.subplots(
            len(sig), 1, figsize=(8, 0.9 * len(sig) + 0.9), squeeze=False, layout="constrained"
        )
        for ax, s in zip(axes[:, 0], sig, strict=True):
            color = {"improved": "#2ca02c", "regressed": "#d62728"}.get(s["verdict"], "#7f7f7f")
            ax.errorbar(
                [s["diff"]],
                [0],
                xerr=[[s["diff"] - s["ci_low"]], [s["ci_high"] - s["diff"]]],
                fmt="o",
                color=color,
                capsize=4,
            )
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks([0], [metric_label(s["metric"], s.get("better")).replace(" (", "\n(")])
            lo, hi = min(s["ci_low"], 0), max(s["ci_high"], 0)
            pad = (hi - lo) * 0.15 or 0.01
            ax.set_xlim(lo - pad, hi + pad)
        axes[0, 0].set_title(
            f"{tuned_name(report)} minus {base_name}, with paired-bootstrap 95% intervals"
        )
        out["significance"] = fig
    bl = report["failures"].get("by_length") or []
    if bl:
        keys = [k for k in bl[0] if k not in ("tokens", "examples")]
        fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
        x = np.arange(len(bl))
        for j, k in enumerate(keys):
            ax.bar(
                x + (j - (len(keys) - 1) / 2) * 0.4,
                [r[k] for r in bl],
                0.4,
                label=k.replace("_", " "),
                color=["#aaaaaa", "#1f77b4"][j % 2],
            )
        ax.set_xticks(x, [f"{r['tokens']}\n(n={r['examples']})" for r in bl])
        ax.set_xlabel("input length (tokens)")
        ax.legend()
        ax.set_title("Errors by input length")
        out["by_length"] = fig
    rb = report.get("robustness", {})
    if rb.get("applies") and rb.get("rows"):
        key = "accuracy" if report["task"] == "classification" else "completion_loss"
        clean = m["tuned"][key]
        fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
        names = [r["perturbation"] for r in rb["rows"]]
        ax.bar(names, [r[key] for r in rb["rows"]], color="#1f77b4")
        ax.axhline(clean, color="black", ls="--", lw=1, label=f"clean test inputs ({clean:.4f})")
        ax.set_ylabel(key.replace("_", " "))
        ax.tick_params(axis="x", labelrotation=20)
        ax.legend()
        ax.set_title("Fine-tuned model on perturbed test inputs")
        out["robustness"] = fig
    return out


# --------------------------------------------------------------------------- markdown


def _md_table(headers: list[str], rows: list[list]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _failure_tables(report: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, headers, rows) of every failure table."""
    f = report["failures"]
    out = []
    if report["task"] in ("preference", "reward"):
        cols = ["index", "margin_baseline", "margin_tuned", "prompt", "chosen", "rejected"]
        out.append(
            (
                "Regressions (the start ranked the pair right, the tuned model wrong), worst first",
                cols,
                [[r[c] for c in cols] for r in f["regressions"]],
            )
        )
        out.append(
            (
                "Persistent failures (both ranked the rejected answer first), worst first",
                cols,
                [[r[c] for c in cols] for r in f["persistent"]],
            )
        )
    elif report["task"] == "classification":
        cols = ["index", "label", "baseline", "tuned", "tuned_confidence", "text"]
        out.append(
            (
                "Regressions (baseline right, fine-tuned wrong), most confident first",
                cols,
                [[r[c] for c in cols] for r in f["regressions"]],
            )
        )
        out.append(
            (
                "Persistent failures (both wrong), most confident first",
                cols,
                [[r[c] for c in cols] for r in f["persistent"]],
            )
        )
        cols2 = ["label", "predicted", "count", "share_of_label"]
        out.append(
            (
                "Most confused label pairs (fine-tuned)",
                cols2,
                [[r[c] for c in cols2] for r in f["confused_pairs"]],
            )
        )
    else:
        cols = [
            "index",
            "token_f1_baseline",
            "token_f1_tuned",
            "prompt",
            "reference",
            "baseline",
            "tuned",
        ]
        out.append(
            (
                "Regressions (answer token F1 fell), worst first",
                cols,
                [[r[c] for c in cols] for r in f["regressions"]],
            )
        )
        out.append(
            (
                "Persistent failures (token F1 below 0.5 for both)",
                cols,
                [[r[c] for c in cols] for r in f["persistent"]],
            )
        )
        cols2 = ["index", "loss_baseline", "loss_tuned", "prompt", "reference"]
        out.append(
            (
                "Completion loss got worse (per token), worst first",
                cols2,
                [[r[c] for c in cols2] for r in f["loss_regressions"]],
            )
        )
    bl = f.get("by_length") or []
    if bl:
        keys = list(bl[0])
        out.append(
            (
                "Errors by input length",
                keys,
                [[fmt(r[k]) if isinstance(r[k], float) else r[k] for k in keys] for r in bl],
            )
        )
    return out


def generation_lines(report: dict) -> list[str]:
    """A preference run's judged answers in sentences: the judge, the win rate with its sign
    test, the KL from the reference (evaluation/preference.py)."""
    g = report.get("generation")
    if not g:
        return []
    w, kl = g["win_rate"], g["kl"]
    return [
        f"Judge: {g['judge_description']}; {g['prompts']} held-out prompts, {g['decoding']} answers "
        f"of at most {g['max_new_tokens']} new tokens.",
        f"Win rate of the tuned answer over the start's: {fmt(w['tuned'])} ({w['wins']} wins, "
        f"{w['losses']} losses, {w['ties']} ties; ties count half), 95% CI of the difference from "
        f"0.5 [{fmt(w.get('ci_low'))}, {fmt(w.get('ci_high'))}], sign test p = "
        f"{fmt_p(w.get('p_value'))}: {w['verdict']}.",
        f"KL of the tuned model from {kl['from']} on its own answers: {fmt(kl['kl_per_token'])} "
        f"per token ({kl['tokens']} tokens of {kl['answers']} answers; mean of the per-answer "
        f"means {fmt(kl['kl_per_answer_mean'])}).",
    ]


def _metric_rows(report: dict) -> tuple[list[str], list[list]]:
    m = report["metrics"]
    keys = [k for k, v in m["tuned"].items() if isinstance(v, int | float)]
    return ["metric", report["baseline"]["name"], tuned_name(report)], [
        [metric_label(k), fmt(m["baseline"].get(k)), fmt(m["tuned"][k])] for k in keys
    ]


def _per_class_rows(report: dict) -> list[list]:
    m = report["metrics"]
    return [
        [
            k,
            fmt(m["baseline"]["per_class"][k]["precision"]),
            fmt(v["precision"]),
            fmt(m["baseline"]["per_class"][k]["recall"]),
            fmt(v["recall"]),
            fmt(m["baseline"]["per_class"][k]["f1"]),
            fmt(v["f1"]),
            v["support"],
        ]
        for k, v in m["tuned"]["per_class"].items()
    ]


def per_class_headers(report: dict) -> list[str]:
    """The per-class table's columns, named after the two models compared."""
    b, t = report["baseline"]["name"], tuned_name(report)
    cols = [f"{m} ({side})" for m in ("precision", "recall", "F1") for side in (b, t)]
    return ["label", *cols, "support"]


def _robust_rows(report: dict) -> tuple[list[str], list[list]]:
    rows = report["robustness"]["rows"]
    keys = list(rows[0])
    return keys, [[fmt(r[k]) if isinstance(r[k], float) else r[k] for k in keys] for r in rows]


def markdown(report: dict) -> str:
    b = report["baseline"]
    parts = [
        f"# ftcli eval: {report['name']}",
        "",
        f"Run `{report['run']}` ({report['task']}, {report['method']} on `{report['model']}`), compared with "
        f"**{b['name']}** on {report['examples_scored']} sealed test examples.",
        "",
        f"**Baseline**: {b['description']}.",
        "",
        *([majority_text(report), ""] if report.get("majority") else []),
        f"**Verdict ({report['primary_metric']})**: {report['verdict_text']}",
        "",
        "## Significance",
        "",
        f"Paired bootstrap 95% intervals ({report['resamples']} resamples) of fine-tuned minus baseline; "
        f"McNemar's exact test for 0/1 outcomes, a paired permutation test otherwise; alpha {report['alpha']}.",
        "",
        _md_table(sig_headers(report), significance_rows(report)),
        "",
        "## Metrics",
        "",
    ]
    if report.get("members"):
        h, rows = member_rows(report)
        parts[-2:-2] = ["## Members", "", _md_table(h, rows), ""]
    h, rows = _metric_rows(report)
    parts += [_md_table(h, rows), ""]
    if report["task"] == "classification":
        parts += [
            "## Per class",
            "",
            _md_table(per_class_headers(report), _per_class_rows(report)),
            "",
        ]
    if report.get("generation"):
        parts += [
            "## Generated answers, judged",
            "",
            *sum(([x, ""] for x in generation_lines(report)), []),
        ]
    ov = report["overfitting"]
    parts += [
        "## Overfitting",
        "",
        ("**Warning.** " if ov["overfitting"] else "") + ov["message"],
        "",
    ]
    if ov.get("gap_end") is not None:
        parts += [
            f"Gap at the end (validation - training loss): {ov['gap_end']:+.4f}. Early stopping "
            f"(patience {ov['patience']}) would have kept step {ov['early_stopping_step']}.",
            "",
        ]
    parts += [
        "## Failures",
        "",
        ", ".join(f"{k}: {v}" for k, v in report["failures"]["counts"].items()),
        "",
    ]
    for title, headers, rows in _failure_tables(report):
        parts += [f"### {title}", "", _md_table(headers, rows) if rows else "(none)", ""]
    rb = report.get("robustness", {})
    parts += ["## Robustness", ""]
    if rb.get("applies"):
        h, rows = _robust_rows(report)
        parts += [_md_table(h, rows), ""]
    else:
        parts += [rb.get("why", "not run"), ""]
    if report.get("stress"):
        parts += [
            "### Stress inputs",
            "",
            _md_table(
                ["case", "ok", "result"],
                [[s["case"], s["ok"], s["result"]] for s in report["stress"]],
            ),
            "",
        ]
    parts += [
        "Plots: see report.html. Per-example predictions of both models: predictions.jsonl.",
        "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-size:1.1rem;padding:.6rem .8rem;border-radius:6px;background:#f4f4f4}
.improved{background:#e3f5e1}.regressed{background:#fbe3e3}.no-significant-change{background:#fff6d6}
.warning{background:#fbe3e3;padding:.5rem .8rem;border-radius:6px}
img.plot{max-width:100%;height:auto;display:block;margin:.5rem 0}
.scroll{max-width:100%;overflow-x:auto}td{overflow-wrap:anywhere}
"""


def _html_table(headers: list[str], rows: list[list]) -> str:
    def td(x) -> str:
        s = html.escape(str(x))
        num = isinstance(x, int | float) or (
            isinstance(x, str) and x[:1] in "+-0123456789." and " " not in x
        )
        return f'<td class="num">{s}</td>' if num else f"<td>{s}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(td(x) for x in r) + "</tr>" for r in rows)
    # a wide table scrolls inside its box on a narrow screen instead of widening the page
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _img(pngs: dict, name: str, alt: str) -> str:
    if name not in pngs:
        return ""
    return f'<img class="plot" data-plot="{name}" alt="{html.escape(alt)}" src="data:image/png;base64,{pngs[name]}">'


def render_html(report: dict, pngs: dict[str, str]) -> str:
    b = report["baseline"]
    esc = html.escape
    v = report["verdict"]
    sec = []
    sec.append(
        f'<section id="summary"><h1>ftcli eval: {esc(report["name"])}</h1>'
        f"<p>Run <code>{esc(report['run'])}</code> ({esc(report['task'])}, {esc(report['method'])} on "
        f"<code>{esc(report['model'])}</code>) compared with <b>{esc(b['name'])}</b> on "
        f"{report['examples_scored']} sealed test examples.</p>"
        f"<p><b>Baseline</b>: {esc(b['description'])}.</p>"
        + (
            f'<p class="majority">{esc(majority_text(report))}</p>'
            if report.get("majority")
            else ""
        )
        + f'<p class="verdict {v.replace(" ", "-")}"><b>Verdict ({esc(report["primary_metric"])})</b>: '
        f"{esc(report['verdict_text'])}</p></section>"
    )
    sec.append(
        '<section id="significance"><h2>Significance</h2>'
        f"<p>Paired bootstrap 95% intervals ({report['resamples']} resamples) of fine-tuned minus baseline; "
        f"McNemar's exact test for 0/1 outcomes, a paired permutation test otherwise; alpha {report['alpha']}.</p>"
        + _html_table(sig_headers(report), significance_rows(report))
        + _img(pngs, "significance", "differences with intervals")
        + "</section>"
    )
    if report.get("members"):
        h, rows = member_rows(report)
        sec.append('<section id="members"><h2>Members</h2>' + _html_table(h, rows) + "</section>")
    h, rows = _metric_rows(report)
    sec.append('<section id="metrics"><h2>Metrics</h2>' + _html_table(h, rows) + "</section>")
    if report.get("generation"):
        sec.append(
            '<section id="generation"><h2>Generated answers, judged</h2>'
            + "".join(f"<p>{esc(x)}</p>" for x in generation_lines(report))
            + "</section>"
        )
    ov = report["overfitting"]
    extra = ""
    if ov.get("gap_end") is not None:
        extra = (
            f"<p>Gap at the end (validation - training loss): {ov['gap_end']:+.4f}. Early stopping (patience "
            f"{ov['patience']}) would have kept step {ov['early_stopping_step']}.</p>"
        )
    sec.append(
        '<section id="curves"><h2>Loss curves and overfitting</h2>'
        + (
            f'<p class="warning"><b>Warning.</b> {esc(ov["message"])}</p>'
            if ov["overfitting"]
            else f"<p>{esc(ov['message'])}</p>"
        )
        + extra
        + (_img(pngs, "curves", "training and validation loss") or "<p>No curves were logged.</p>")
        + "</section>"
    )
    if report["task"] == "classification":
        sec.append(
            '<section id="confusion"><h2>Confusion matrices</h2>'
            + _img(pngs, "confusion", "confusion matrices")
            + "</section>"
        )
        sec.append(
            '<section id="per-class"><h2>Per class</h2>'
            + _html_table(per_class_headers(report), _per_class_rows(report))
            + _img(pngs, "per_class", "per-class precision, recall and F1")
            + "</section>"
        )
    counts = ", ".join(f"{esc(k)}: {v}" for k, v in report["failures"]["counts"].items())
    ft = "".join(
        f"<h3>{esc(t)}</h3>" + (_html_table(hh, rr) if rr else "<p>(none)</p>")
        for t, hh, rr in _failure_tables(report)
    )
    sec.append(
        f'<section id="failures"><h2>Failures</h2><p>{counts}</p>{ft}'
        + _img(pngs, "by_length", "errors by input length")
        + "</section>"
    )
    rb = report.get("robustness", {})
    if rb.get("applies"):
        h, rows = _robust_rows(report)
        body = _html_table(h, rows) + _img(pngs, "robustness", "metrics on perturbed inputs")
    else:
        body = f"<p>{esc(rb.get('why', 'not run'))}</p>"
    if report.get("stress"):
        body += "<h3>Stress inputs</h3>" + _html_table(
            ["case", "ok", "result"], [[s["case"], s["ok"], s["result"]] for s in report["stress"]]
        )
    sec.append(f'<section id="robustness"><h2>Robustness</h2>{body}</section>')
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ftcli eval: {esc(report['name'])}</title><style>{CSS}</style></head><body>"
        + "".join(sec)
        + "</body></html>\n"
    )


def jsonable(obj):
    """NaN and infinity become null, so report.json and --json output are strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def write_report(report: dict, predictions: list[dict], out: Path) -> dict[str, str]:
    """Write the four files into ``out`` at once (built beside it, then renamed into place)."""
    names = {
        "json": "report.json",
        "markdown": "report.md",
        "html": "report.html",
        "predictions": "predictions.jsonl",
    }
    files = {k: str(out / v) for k, v in names.items()}
    report["files"] = files
    pngs = plots(report)
    with atomic_dir(out) as tmp:
        (tmp / names["json"]).write_text(
            json.dumps(jsonable(report), indent=2, default=str, allow_nan=False) + "\n",
            encoding="utf-8",
        )
        (tmp / names["markdown"]).write_text(markdown(report), encoding="utf-8")
        (tmp / names["html"]).write_text(render_html(report, pngs), encoding="utf-8")
        (tmp / names["predictions"]).write_text(
            "".join(
                json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False) + "\n"
                for r in predictions
            ),
            encoding="utf-8",
        )
    return files
