"""``ftcli predict``: requests from --text or a file, answered in batches (one adapter switch per
adapter), written as JSON lines or CSV."""

from __future__ import annotations

import json
from pathlib import Path

from ftcli.data.read import read_file
from ftcli.errors import FtcliError
from ftcli.serve.predictor import Predictor
from ftcli.util import atomic_write_text, write_jsonl


def read_requests(
    texts: list[str] | None, input_path: str | None, text_column: str = "text"
) -> list[dict]:
    """Requests from --text and/or a file: {"text"} or {"messages"}, with an optional "adapter"."""
    rows: list[dict] = [{"text": t} for t in texts or []]
    if input_path:
        if not Path(input_path).is_file():
            raise FtcliError(f"{input_path} does not exist")
        for i, r in enumerate(read_file(input_path)):
            req: dict = {}
            if isinstance(r.get("messages"), list):
                req["messages"] = r["messages"]
            elif text_column in r:
                req["text"] = "" if r[text_column] is None else str(r[text_column])
            else:
                raise FtcliError(
                    f"{input_path}: row {i + 1} has no {text_column!r} column (columns: {', '.join(r)})",
                    hint="name the text column with --text-column",
                )
            if r.get("adapter"):
                req["adapter"] = str(r["adapter"])
            rows.append(req)
    if not rows:
        raise FtcliError("nothing to predict", hint="give --text '...' or --input FILE")
    return rows


def predict(
    pred: Predictor,
    requests: list[dict],
    batch_size: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    raw: bool = False,
    progress=None,
) -> list[dict]:
    """Answer every request. With several adapters, a request naming one goes to it; the others go
    to every adapter (one output row each), so adapters can be compared on the same inputs."""
    jobs: dict[str | None, list[int]] = {}
    expanded: list[dict] = []
    for r in requests:
        targets = [r["adapter"]] if r.get("adapter") else (list(pred.adapters) or [None])
        for a in targets:
            if a is not None and a not in pred.adapters:
                raise FtcliError(
                    f"a request names adapter {a!r}, which is not loaded",
                    hint=f"loaded: {', '.join(pred.adapters) or '(none)'}",
                )
            row = {k: v for k, v in r.items() if k != "adapter"}
            if a is not None:
                row["adapter"] = a
            jobs.setdefault(a, []).append(len(expanded))
            expanded.append(row)
    for adapter, idx in jobs.items():  # one switch per adapter, not per request
        pred.use(adapter)
        if pred.task == "classification":
            if any("messages" in expanded[i] for i in idx):
                raise FtcliError("a classifier takes text, not messages")
            for i, res in zip(
                idx,
                pred.classify([expanded[i]["text"] for i in idx], batch_size, progress),
                strict=True,
            ):
                expanded[i].update(res)
        else:
            convs = [
                expanded[i].get("messages") or [{"role": "user", "content": expanded[i]["text"]}]
                for i in idx
            ]
            gens = pred.generate(
                convs, max_new_tokens, min(batch_size, 8), temperature, raw, progress
            )
            for i, g in zip(idx, gens, strict=True):
                expanded[i]["generation"] = g
    return expanded


def write_predictions(rows: list[dict], path: Path) -> None:
    """JSON lines, or CSV (probabilities as prob_<label> columns) when the name ends in .csv."""
    if path.suffix.lower() == ".csv":
        import pandas as pd

        flat = []
        for r in rows:
            f = {
                k: (json.dumps(v, ensure_ascii=False) if k == "messages" else v)
                for k, v in r.items()
                if k != "probs"
            }
            f.update({f"prob_{k}": v for k, v in (r.get("probs") or {}).items()})
            flat.append(f)
        atomic_write_text(path, pd.DataFrame(flat).to_csv(index=False))
    else:
        write_jsonl(path, rows)


def progress_total(requests: list[dict], pred: Predictor) -> int:
    """The progress bar's total for ``predict``: each request once per loaded adapter, or once when
    every request names its own adapter."""
    return len(requests) * (
        1 if all(r.get("adapter") for r in requests) else max(1, len(pred.adapters))
    )


def progress_bar(console, total: int, what: str):
    """A rich progress bar over requests (off when the console is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task(what, total=total)
    return bar, lambda n: bar.advance(task, n)


def show_predictions(ui, pred: Predictor, rows: list[dict], output: Path | None) -> None:
    """``ftcli predict``'s table: the first 50 labels with their probability, or prompts with their
    answers (an adapter column when several adapters answered), and how many more there are."""
    lead = ("adapter",) if pred.adapters else ()
    if pred.task == "classification":
        table = [
            (*((r["adapter"],) if lead else ()), r["text"][:60], r["label"], f"{r['score']:.3f}")
            for r in rows[:50]
        ]
        ui.table(
            f"predictions ({pred.source})", table, headers=(*lead, "text", "label", "probability")
        )
    else:
        table = [
            (
                *((r["adapter"],) if lead else ()),
                (r.get("text") or r["messages"][-1]["content"])[:50],
                r["generation"][:200],
            )
            for r in rows[:50]
        ]
        ui.table(f"generations ({pred.source})", table, headers=(*lead, "prompt", "answer"))
    if len(rows) > 50:
        ui.info(
            f"... {len(rows) - 50} more"
            + ("" if output else " (use --output FILE or --json for all)")
        )
