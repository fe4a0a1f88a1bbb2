"""The eval folder's index (every report in RUN_DIR/eval/, one row each: the fine-tuned model vs
each baseline side by side), and the benchmark report (eval/benchmarks/: the table, and every
document's outcome for both models, one JSON-lines file per task).

Each comparison keeps its own folder (base/, probe/, tfidf/, majority/, vs-<run>/, benchmarks/), so
a second ``ftcli eval`` never overwrites the first; the index is rebuilt from the reports on disk.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ftcli.evaluation.report import (
    CSS,
    _ci,
    _html_table,
    _md_table,
    jsonable,
    metric_label,
)
from ftcli.evaluation.stats import fmt, fmt_p
from ftcli.util import atomic_dir, atomic_write_text, read_json

INDEX_FILES = {"json": "index.json", "markdown": "index.md", "html": "index.html"}


def _page(title: str, body: str) -> str:
    esc = html.escape
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )


# --------------------------------------------------------------------------- benchmarks

BENCH_HEADERS = [
    "task",
    "metric",
    "n",
    "base",
    "fine-tuned",
    "difference",
    "95% CI",
    "p",
    "test",
    "verdict",
]


def benchmark_rows(report: dict) -> list[list]:
    return [
        [
            s["task"] + ("" if s["filter"] == "none" else f" ({s['filter']})"),
            metric_label(s["metric"], s["better"]),
            s["n"],
            fmt(s["baseline"]),
            fmt(s["tuned"]),
            f"{s['diff']:+.4f}",
            _ci(s),
            fmt_p(s.get("p_value")),
            s.get("test", "-"),
            f"{s['ability']} ({s['verdict']})",
        ]
        for s in report["significance"]
    ]


def benchmark_intro(report: dict) -> str:
    shots = "default" if report["num_fewshot"] is None else report["num_fewshot"]
    lim = "all documents" if report["limit"] is None else f"the first {report['limit']} documents"
    return (
        f"Run {report['run']} ({report['method']} on {report['model']}) and its base model, scored by "
        f"lm-evaluation-harness {report['lm_eval_version']} on {lim} of each task ({shots} few-shot), "
        f"paired per document: paired bootstrap 95% intervals ({report['resamples']} resamples) of "
        "fine-tuned minus base, McNemar's exact test for 0/1 outcomes, a paired permutation test "
        f"otherwise, alpha {report['alpha']}. Verdict: kept (no significant change), gained or lost."
    )


def benchmark_markdown(report: dict) -> str:
    parts = [
        f"# ftcli eval --benchmark: {report['name']}",
        "",
        benchmark_intro(report),
        "",
        "## Benchmarks",
        "",
        _md_table(BENCH_HEADERS, benchmark_rows(report)),
        "",
        *[f"- {v}" for v in report["verdicts"]],
        "",
        "Per-document results of both models: <task>.jsonl beside this file.",
        "",
    ]
    return "\n".join(parts)


def benchmark_html(report: dict) -> str:
    esc = html.escape
    body = (
        f'<section id="summary"><h1>ftcli eval --benchmark: {esc(report["name"])}</h1>'
        f"<p>{esc(benchmark_intro(report))}</p></section>"
        '<section id="benchmarks"><h2>Benchmarks</h2>'
        + _html_table(BENCH_HEADERS, benchmark_rows(report))
        + "<ul>"
        + "".join(f"<li>{esc(v)}</li>" for v in report["verdicts"])
        + "</ul><p>Per-document results of both models: <code>&lt;task&gt;.jsonl</code> beside this file.</p>"
        "</section>"
    )
    return _page(f"ftcli eval --benchmark: {report['name']}", body)


def write_benchmark_report(report: dict, per_doc: dict[str, list[dict]], out: Path) -> dict:
    """report.json, report.md, report.html and one <task>.jsonl of per-document outcomes, at once."""
    files = {"json": str(out / "report.json"), "markdown": str(out / "report.md")}
    files["html"] = str(out / "report.html")
    files.update({f"documents:{t}": str(out / f"{t}.jsonl") for t in per_doc})
    report["files"] = files
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(
            json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        (tmp / "report.md").write_text(benchmark_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(benchmark_html(report), encoding="utf-8")
        for task, rows in per_doc.items():
            (tmp / f"{task}.jsonl").write_text(
                "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in rows),
                encoding="utf-8",
            )
    return files


def print_benchmarks(report: dict, ui) -> None:
    if not ui.enabled:
        return
    ui.table(
        f"{report['name']}: base vs fine-tuned on benchmarks (paired per document)",
        [tuple(r) for r in benchmark_rows(report)],
        headers=tuple(BENCH_HEADERS),
    )
    for v in report["verdicts"]:
        ui.info(v)
    ui.info("report: " + ", ".join(report["files"].values()))


# --------------------------------------------------------------------------- index

INDEX_HEADERS = [
    "report",
    "baseline",
    "metric",
    "baseline value",
    "fine-tuned",
    "difference",
    "95% CI",
    "p",
    "verdict",
]


def index_rows(root: Path) -> list[dict]:
    """One row per primary comparison found in ``root``'s report folders (benchmarks: per metric)."""
    rows = []
    for path in sorted(root.glob("*/report.json")):
        rep = read_json(path)
        folder = path.parent.name
        if rep.get("ftcli_benchmarks"):
            for s in rep.get("significance", []):
                rows.append(
                    {
                        "folder": folder,
                        "kind": "benchmark",
                        "baseline": "base",
                        "description": f"lm-eval task {s['task']}",
                        "metric": f"{s['task']}: {s['metric']}",
                        "value_baseline": s["baseline"],
                        "tuned": s["tuned"],
                        "diff": s["diff"],
                        "ci_low": s.get("ci_low"),
                        "ci_high": s.get("ci_high"),
                        "p_value": s.get("p_value"),
                        "better": s.get("better"),
                        "verdict": f"{s['ability']} ({s['verdict']})",
                    }
                )
            continue
        if not rep.get("ftcli_eval"):
            continue
        top = next(
            (s for s in rep.get("significance", []) if s["metric"] == rep.get("primary_metric")),
            None,
        )
        if top is None:
            continue
        rows.append(
            {
                "folder": folder,
                "kind": rep["baseline"]["kind"],
                "baseline": rep["baseline"]["name"],
                "description": rep["baseline"]["description"],
                "metric": top["metric"],
                "value_baseline": top["baseline"],
                "tuned": top["tuned"],
                "diff": top["diff"],
                "ci_low": top.get("ci_low"),
                "ci_high": top.get("ci_high"),
                "p_value": top.get("p_value"),
                "better": top.get("better"),
                "verdict": rep["verdict"],
                "majority": rep.get("majority"),
                "examples": rep.get("examples_scored"),
            }
        )
    return rows


def _cells(r: dict) -> list:
    return [
        r["folder"],
        r["baseline"],
        metric_label(r["metric"], r.get("better")),
        fmt(r["value_baseline"]),
        fmt(r["tuned"]),
        f"{r['diff']:+.4f}",
        _ci(r),
        fmt_p(r.get("p_value")),
        r["verdict"],
    ]


def write_index(root: Path, ui=None) -> dict:
    """Rebuild ``root``/index.{json,md,html} from every report under ``root``."""
    root = Path(root)
    rows = index_rows(root)
    majority = next((r["majority"] for r in rows if r.get("majority")), None)
    index = {
        "ftcli_eval_index": 1,
        "folder": str(root),
        "reports": rows,
        "majority": majority,
        "files": {k: str(root / v) for k, v in INDEX_FILES.items()},
    }
    floor = (
        f"Majority rate (always {majority['label']!r}): {fmt(majority['test_accuracy'])}."
        if majority
        else ""
    )
    md = [
        "# ftcli eval: every report of this run",
        "",
        "The fine-tuned model against each baseline on the same sealed test examples (primary "
        "metric), and base vs fine-tuned on each benchmark. Full reports: FOLDER/report.html.",
        "",
        floor,
        "",
        _md_table(INDEX_HEADERS, [_cells(r) for r in rows]),
        "",
        *[f"- **{r['folder']}**: {r['description']}" for r in rows if r["kind"] != "benchmark"],
        "",
    ]
    esc = html.escape
    table = _html_table(INDEX_HEADERS, [_cells(r) for r in rows])
    for folder in sorted({r["folder"] for r in rows}):  # each report's name links to it
        cell = f"<td>{esc(folder)}</td>"
        table = table.replace(
            cell, f'<td><a href="{esc(folder)}/report.html">{esc(folder)}</a></td>'
        )
    body = (
        '<section id="index"><h1>ftcli eval: every report of this run</h1>'
        "<p>The fine-tuned model against each baseline on the same sealed test examples (primary "
        "metric), and base vs fine-tuned on each benchmark.</p>"
        + (f'<p class="majority">{esc(floor)}</p>' if floor else "")
        + table
        + "<ul>"
        + "".join(
            f"<li><b>{esc(r['folder'])}</b>: {esc(r['description'])}</li>"
            for r in rows
            if r["kind"] != "benchmark"
        )
        + "</ul></section>"
    )
    atomic_write_text(
        root / INDEX_FILES["json"], json.dumps(jsonable(index), indent=2, allow_nan=False) + "\n"
    )
    atomic_write_text(root / INDEX_FILES["markdown"], "\n".join(md))
    atomic_write_text(root / INDEX_FILES["html"], _page("ftcli eval: index", body))
    if ui is not None and ui.enabled and len(rows) > 1:
        ui.table(
            f"every report in {root}",
            [tuple(_cells(r)) for r in rows],
            headers=tuple(INDEX_HEADERS),
        )
    if ui is not None:
        ui.info(f"index: {root / INDEX_FILES['html']}")
    return jsonable(index)
