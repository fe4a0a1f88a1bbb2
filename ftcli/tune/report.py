"""What ``ftcli tune`` shows of a study: the trials table it prints, and tune/report.html (the
optimisation history, parameter importances and each trial's validation curve, self-contained
with PNG plots inlined, in the style of eval's report)."""

from __future__ import annotations

import html
from pathlib import Path

from ftcli.evaluation.report import CSS, _html_table, _img, _png
from ftcli.recipe import Recipe
from ftcli.ui import UI
from ftcli.util import atomic_write_text


def fmt(v) -> str:
    """A parameter value as the table shows it (floats to 3 significant digits)."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def trial_rows(study) -> list[dict]:
    """One plain row per stored trial, all processes' together (trials given back unrun past the
    budget aside): what the table, the report and ``--json`` show."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING" and "fixed_params" not in t.system_attrs:
            continue  # asked past the budget and given back unrun: not a trial yet
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": t.params,
                "pruned_at": t.user_attrs.get("pruned_at"),
                "steps": t.user_attrs.get("steps"),
                "run_dir": t.user_attrs.get("run_dir"),
                "curve": {int(k): v for k, v in sorted(t.intermediate_values.items())},
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else None,
            }
        )
    return rows


def print_table(ui: UI, recipe: Recipe, rows: list[dict]) -> None:
    """The trials table on the terminal: state, validation value, steps and the space's values."""
    keys = list(recipe.tune.space)
    table = []
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        where = f"pruned at step {r['pruned_at']}" if r["pruned_at"] is not None else ""
        table.append(
            (
                r["number"],
                r["state"],
                value,
                where or (r["steps"] if r["steps"] is not None else ""),
                *[fmt(r["params"].get(k, "-")) for k in keys],
            )
        )
    ui.table(
        f"{recipe.name}: {len(rows)} trials (validation {recipe.tune.metric})",
        table,
        headers=("trial", "state", recipe.tune.metric, "steps", *keys),
    )


def plots(result: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    rows = result["trials"]
    maximize = result["direction"] == "maximize"
    done = [r for r in rows if r["state"] == "complete"]
    if done:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        xs = [r["number"] for r in done]
        ys = [r["value"] for r in done]
        ax.scatter(xs, ys, s=18, label="completed trial")
        best, run = [], None
        for y in ys:
            run = y if run is None else (max(run, y) if maximize else min(run, y))
            best.append(run)
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
        pruned = [r for r in rows if r["state"] == "pruned" and r["curve"]]
        if pruned:
            ax.scatter(
                [r["number"] for r in pruned],
                [list(r["curve"].values())[-1] for r in pruned],
                s=18,
                marker="x",
                color="grey",
                label="pruned (last report)",
            )
        ax.set_xlabel("trial")
        ax.set_ylabel(f"validation {result['metric']}")
        ax.legend(fontsize=8)
        out["history"] = _png(fig)
    imp = result.get("importances") or {}
    if imp:
        fig, ax = plt.subplots(figsize=(6, 0.4 + 0.35 * len(imp)))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlabel("importance (fANOVA, share of variance)")
        out["importances"] = _png(fig)
    curves = [r for r in rows if r["curve"]]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        best = (result.get("best") or {}).get("number")
        for r in curves:
            steps, vals = list(r["curve"]), list(r["curve"].values())
            style = {"lw": 2.2, "color": "tab:red"} if r["number"] == best else {"lw": 0.9}
            ls = ":" if r["state"] == "pruned" else "-"
            ax.plot(steps, vals, ls, label=f"trial {r['number']} ({r['state']})", **style)
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {result['metric']}")
        if len(curves) <= 12:
            ax.legend(fontsize=7, ncol=2)
        out["curves"] = _png(fig)
    return out


def render_html(result: dict, pngs: dict[str, str]) -> str:
    esc = html.escape
    best = result.get("best")
    keys = sorted({k for r in result["trials"] for k in r["params"]})
    sec = [
        f'<section id="summary"><h1>ftcli tune: {esc(result["name"])}</h1>'
        f"<p>{len(result['trials'])} trials, sampler {esc(result['sampler'])}, pruner "
        f"{esc(result['pruner'])}; selection on the <b>validation</b> split "
        f"({esc(result['metric'])}, {esc(result['direction'])}). No trial was scored on the "
        f"sealed test split.</p>"
    ]
    if best:
        test = best.get("test")
        test_text = (
            "Scored once on the sealed test split at the end: "
            + ", ".join(f"{esc(k)} {v:.4f}" for k, v in test.items() if isinstance(v, float))
            + "."
            if test
            else "Not yet scored on the test split (trials were still running elsewhere)."
        )
        sec.append(
            f"<p><b>Best</b>: trial {best['number']}, validation {esc(result['metric'])} "
            f"{best['value']:.4f} ({esc(', '.join(f'{k}={v}' for k, v in best['params'].items()))}). "
            f"{test_text} Recipe: <code>{esc(best['recipe'])}</code>.</p>"
        )
    sec.append("</section>")
    rows = [
        [
            r["number"],
            r["state"],
            f"{r['value']:.4f}" if r["value"] is not None else "-",
            f"pruned at {r['pruned_at']}" if r["pruned_at"] is not None else (r["steps"] or "-"),
            *[r["params"].get(k, "-") for k in keys],
        ]
        for r in result["trials"]
    ]
    sec.append(
        '<section id="trials"><h2>Trials</h2>'
        + _html_table(["trial", "state", result["metric"], "steps", *keys], rows)
        + "</section>"
    )
    sec.append(
        '<section id="history"><h2>Optimisation history</h2>'
        + (_img(pngs, "history", "optimisation history") or "<p>No completed trial yet.</p>")
        + "</section>"
    )
    imp = result.get("importances") or {}
    sec.append(
        '<section id="importances"><h2>Parameter importances</h2>'
        + (
            _html_table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()])
            + _img(pngs, "importances", "parameter importances")
            if imp
            else "<p>Too few completed trials with distinct values to estimate importances.</p>"
        )
        + "</section>"
    )
    sec.append(
        '<section id="curves"><h2>Validation curves</h2><p>What each trial reported to the pruner '
        "at each validation (dotted: pruned).</p>"
        + (_img(pngs, "curves", "per-trial validation curves") or "<p>No curve reported.</p>")
        + "</section>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>ftcli tune: {esc(result['name'])}</title><style>{CSS}</style></head><body>"
        + "".join(sec)
        + "</body></html>"
    )


def write_tune_report(result: dict, root: Path) -> Path:
    path = root / "report.html"
    atomic_write_text(path, render_html(result, plots(result)))
    return path
