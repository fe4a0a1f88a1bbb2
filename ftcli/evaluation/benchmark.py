"""``ftcli eval RUN --benchmark TASK``: lm-evaluation-harness tasks scored by the base model and by
the fine-tuned one, in one process, paired per document.

The harness does the prompting and the per-document scoring (``HFLM`` takes the loaded model,
``log_samples`` keeps every document's outcome); ftcli pairs the two models' outcomes by document
and applies the same statistics as ``--baseline`` (paired bootstrap interval, McNemar's exact test
for 0/1 outcomes, else a paired permutation test), with a verdict about general ability: kept,
gained or lost. Bundled tasks (ftcli/bundled/benchmarks/) run offline; their ``data_files`` are relative
to the YAML and resolved here, so they work from any folder.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ftcli.bundled import benchmarks_dir
from ftcli.errors import FtcliError
from ftcli.evaluation import stats
from ftcli.evaluation.metrics import Headline

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
WORDS = {
    stats.IMPROVED: "gained",
    stats.REGRESSED: "lost",
    stats.NO_CHANGE: "kept",
    stats.NEUTRAL: "n/a",
}
OFFLINE_HINT = (
    "point --tasks-path at a folder of lm-eval task YAMLs that read local files (dataset_path: "
    "json, dataset_kwargs: {data_files: {test: FILE}}; see ftcli/bundled/benchmarks/rt_sentiment.yaml), "
    "or run once where the hub is reachable so datasets caches the data. Bundled offline tasks: "
)


def bundled_tasks() -> list[str]:
    """The bundled offline tasks' names (ftcli/bundled/benchmarks/*.yaml)."""
    return sorted(p.stem for p in benchmarks_dir().glob("*.yaml"))


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise FtcliError(
            "--benchmark needs lm-evaluation-harness, which is not installed",
            hint="pip install 'ftcli[benchmarks]'",
        ) from None


@contextmanager
def _quiet():
    """The harness logs every request batch at INFO: keep its warnings, drop the chatter."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- tasks


def _resolve_files(cfg: dict, folder: Path) -> dict:
    """Make a local task's relative ``data_files`` relative to its YAML, and check they exist."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        raise FtcliError(
            f"benchmark task {cfg['task']!r} reads dataset_path {cfg['dataset_path']!r} but names no "
            "dataset_kwargs.data_files",
            hint="add dataset_kwargs: {data_files: {test: FILE.jsonl}} to its YAML",
        )

    def fix(p: str) -> str:
        path = Path(p).expanduser()
        if not path.is_absolute() and (folder / path).exists():
            path = folder / path
        if not path.exists():
            raise FtcliError(
                f"benchmark task {cfg['task']!r}: data file {p} not found (looked beside "
                f"{folder} and in the working folder)",
                hint="give data_files relative to the task YAML, or an absolute path",
            )
        return str(path.resolve())

    if isinstance(files, str):
        files = fix(files)
    elif isinstance(files, list):
        files = [fix(p) for p in files]
    else:
        files = {
            k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()
        }
    kwargs["data_files"] = files
    return {**cfg, "dataset_kwargs": kwargs}


def _check_hub_data(name: str, dataset: str) -> None:
    """Fail fast when a task's data lives on the hub and cannot be had (not cached, offline)."""
    from ftcli.sources import _hub_reachable, hub_offline, hub_offline_with_datasets_cache

    if hub_offline_with_datasets_cache(dataset):
        return
    why = (
        "offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) forbids downloading it"
        if hub_offline()
        else _hub_reachable()
    )
    if why:
        raise FtcliError(
            f"benchmark task {name!r} reads the hub dataset {dataset!r}, which is not local and not "
            f"cached, and {why}",
            hint=OFFLINE_HINT + ", ".join(bundled_tasks()),
        )


def resolve_tasks(names: list[str], tasks_path: Path | None):
    """(task specs for the harness, its TaskManager): local YAML tasks as full configs with their
    data files resolved, the harness's own tasks by name after the offline check."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    paths = [benchmarks_dir()]
    if tasks_path is not None:
        if not Path(tasks_path).is_dir():
            raise FtcliError(
                f"--tasks-path {tasks_path} is not a folder",
                hint="give the folder that holds the task YAMLs",
            )
        paths.insert(0, Path(tasks_path))
    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    specs, need_defaults = [], []
    for name in names:
        entry = local.task_index.get(name)
        if entry is None:
            need_defaults.append(name)
            continue
        if entry.kind != Kind.TASK or not entry.yaml_path:
            specs.append(name)  # a local group or tag: the harness builds it
            continue
        cfg = load_yaml(entry.yaml_path)
        if cfg.get("dataset_path") in LOCAL_BUILDERS:
            cfg = _resolve_files(cfg, Path(entry.yaml_path).parent)
        elif cfg.get("dataset_path") and not Path(cfg["dataset_path"]).exists():
            _check_hub_data(name, cfg["dataset_path"])
        specs.append(cfg)
    manager = local
    if need_defaults:
        import difflib

        manager = TaskManager(include_path=[str(p) for p in paths])
        for name in need_defaults:
            entry = manager.task_index.get(name)
            if entry is None:
                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                raise FtcliError(
                    f"unknown benchmark task {name!r}"
                    + (f" (did you mean {', '.join(close)}?)" if close else ""),
                    hint="bundled tasks: "
                    + ", ".join(bundled_tasks())
                    + "; your own task YAMLs: --tasks-path DIR",
                )
            if entry.kind == Kind.TASK and entry.yaml_path:
                cfg = load_yaml(entry.yaml_path, resolve_func=False)
                if cfg.get("dataset_path") and cfg["dataset_path"] not in LOCAL_BUILDERS:
                    _check_hub_data(name, cfg["dataset_path"])
            elif _needs_hub():
                raise FtcliError(
                    f"benchmark {name!r} is a group of the harness's tasks, whose data comes from "
                    "the hub, which cannot be reached here",
                    hint=OFFLINE_HINT + ", ".join(bundled_tasks()),
                )
            specs.append(name)
    return specs, manager


def _needs_hub() -> bool:
    from ftcli.sources import _hub_reachable, hub_offline

    return hub_offline() or _hub_reachable() is not None


# --------------------------------------------------------------------------- scoring


def check_causal(task: str) -> None:
    if task != "causal_lm":
        raise FtcliError(
            "benchmarks need a causal language model: this run is a classifier (an encoder or a "
            "sequence-classification head), which cannot score the harness's prompts",
            hint="run --benchmark on a causal_lm run; compare classifiers with --baseline probe|tfidf|majority",
        )


def run_harness(model, tok, specs, manager, limit, num_fewshot, batch_size) -> dict:
    """One model through the harness: {task: {"samples": [...], "higher_is_better": {...},
    "results": {...}, "n_shot": int}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    try:
        with _quiet():
            out = simple_evaluate(
                model=lm,
                tasks=specs,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=True,
                bootstrap_iters=0,
            )
    except (ConnectionError, OSError) as exc:
        raise FtcliError(
            f"the harness could not load a task's data: {str(exc).splitlines()[0]}",
            hint=OFFLINE_HINT + ", ".join(bundled_tasks()),
        ) from None
    return {
        task: {
            "samples": samples,
            "higher_is_better": out["higher_is_better"].get(task, {}),
            "results": out["results"].get(task, {}),
            "n_shot": out["n-shot"].get(task),
        }
        for task, samples in out["samples"].items()
    }


def _scalar(v) -> float | None:
    if isinstance(v, bool | int | float | np.floating | np.integer):
        return float(v)
    return None


def per_document(base: dict, tuned: dict) -> list[dict]:
    """Both models' outcomes of one task, paired by (document, filter)."""
    b = {(s["doc_id"], s.get("filter", "none")): s for s in base["samples"]}
    t = {(s["doc_id"], s.get("filter", "none")): s for s in tuned["samples"]}
    if b.keys() != t.keys():
        raise FtcliError("the two models were scored on different documents; cannot pair them")
    metrics = list(tuned["higher_is_better"])
    rows = []
    for key in sorted(t):
        row = {"doc_id": key[0], "filter": key[1], "doc_hash": t[key].get("doc_hash")}
        for side, s in (("base", b[key]), ("tuned", t[key])):
            row[side] = {m: _scalar(s.get(m)) for m in metrics if m in s}
        rows.append(row)
    return rows


def compare_task(
    task: str, rows: list[dict], higher: dict, n_resamples: int, seed: int
) -> list[dict]:
    """One significance row per scalar metric (and filter) of a task."""
    out = []
    for filt in sorted({r["filter"] for r in rows}):
        sub = [r for r in rows if r["filter"] == filt]
        for metric, hib in higher.items():
            vals = [(r["base"].get(metric), r["tuned"].get(metric)) for r in sub]
            if not vals or any(x is None or y is None for x, y in vals):
                continue  # a corpus-level metric (BLEU, F1 over the set): nothing to pair
            x = np.concatenate([[v[0] for v in vals], [v[1] for v in vals]]).astype(float)
            n = len(vals)
            binary = bool(np.isin(x, (0.0, 1.0)).all())
            h = Headline(
                metric,
                lambda rows_, pos, x=x: x[rows_].mean(axis=-1),
                +1 if hib else -1,
                "mcnemar" if binary else "permutation",
                x if binary else None,
                n,
            )
            row = stats.compare(h, n_resamples, seed)
            row.update(task=task, filter=filt, ability=WORDS[row["verdict"]])
            out.append(row)
    return out


def benchmark_text(row: dict) -> str:
    """A row's verdict in words: kept / gained / lost general ability."""
    what = {
        "kept": "kept its ability",
        "gained": "gained",
        "lost": "lost ability",
        "n/a": "not tested",
    }[row["ability"]]
    return (
        f"{row['task']} ({row['metric']}): {what}: base {stats.fmt(row['baseline'])} -> fine-tuned "
        f"{stats.fmt(row['tuned'])}, difference {row['diff']:+.4f}, 95% CI "
        f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}], {row['test']} p = "
        f"{stats.fmt_p(row['p_value'])}, n = {row['n']}"
    )


def eval_benchmarks(
    run_dir: Path,
    tasks: list[str],
    ui,
    tasks_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    n_resamples: int = 9999,
    seed: int = 0,
) -> tuple[dict, dict[str, list[dict]]]:
    """Score the run's base and fine-tuned model on ``tasks``; (report, per-document rows by task)."""
    from ftcli.evaluation.baseline import load_base
    from ftcli.models import load_trained, resolve_device, to_device
    from ftcli.rundir import open_run

    rd = open_run(run_dir)
    r = rd.recipe
    check_causal(r.task)
    specs, manager = resolve_tasks(tasks, tasks_path)
    device = resolve_device("auto")
    bs = r.eval.batch_size
    ui.step(f"benchmarks {', '.join(tasks)}: the fine-tuned model of {rd.run_dir}")
    model, tok = load_trained(rd.run_dir, r.task)
    to_device(model, device)
    tuned = run_harness(model, tok, specs, manager, limit, num_fewshot, bs)
    del model
    gc.collect()
    ui.step(f"benchmarks {', '.join(tasks)}: the base model {r.model.name}")
    base_model, desc = load_base(r, rd.run_dir, None, tok, device)
    to_device(base_model, device)
    base = run_harness(base_model, tok, specs, manager, limit, num_fewshot, bs)
    del base_model
    gc.collect()
    ui.step(f"paired statistics per document ({n_resamples} resamples)")
    per_doc, rows = {}, []
    for task in tuned:
        per_doc[task] = per_document(base[task], tuned[task])
        rows += compare_task(
            task, per_doc[task], tuned[task]["higher_is_better"], n_resamples, seed
        )
    import lm_eval

    report = {
        "ftcli_benchmarks": 1,
        "run": str(rd.run_dir),
        "name": r.name,
        "model": r.model.name,
        "method": r.method.kind,
        "baseline": {"kind": "base", "name": "base", "description": desc},
        "tasks": {
            t: {
                "documents": len({d["doc_id"] for d in per_doc[t]}),
                "n_shot": tuned[t]["n_shot"],
                "harness_base": base[t]["results"],
                "harness_tuned": tuned[t]["results"],
            }
            for t in tuned
        },
        "limit": limit,
        "num_fewshot": num_fewshot,
        "tasks_path": str(tasks_path) if tasks_path else None,
        "lm_eval_version": lm_eval.__version__,
        "alpha": stats.ALPHA,
        "resamples": n_resamples,
        "seed": seed,
        "significance": rows,
        "verdicts": [benchmark_text(x) for x in rows],
    }
    return report, per_doc


def parse_tasks(spec: list[str] | str) -> list[str]:
    """``--benchmark a,b --benchmark c`` -> [a, b, c] (each once, in order)."""
    items = [spec] if isinstance(spec, str) else spec
    out: list[str] = []
    for item in items:
        for name in item.split(","):
            if name.strip() and name.strip() not in out:
                out.append(name.strip())
    if not out:
        raise FtcliError("--benchmark needs a task name", hint="e.g. --benchmark rt_sentiment")
    return out


def benchmark_run(
    run_dir: Path,
    tasks: list[str] | str,
    ui,
    out_dir: Path | None = None,
    tasks_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    n_resamples: int = 9999,
    seed: int = 0,
) -> dict:
    """``ftcli eval RUN --benchmark TASKS``: score, write eval/benchmarks/ and the eval index."""
    from ftcli.evaluation.report import jsonable
    from ftcli.evaluation.summary import print_benchmarks, write_benchmark_report, write_index

    if limit is not None and limit < 1:
        raise FtcliError(
            "--limit must be at least 1", hint="or leave it out to score every document"
        )
    report, per_doc = eval_benchmarks(
        run_dir, parse_tasks(tasks), ui, tasks_path, limit, num_fewshot, n_resamples, seed
    )
    root = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    report["files"] = write_benchmark_report(report, per_doc, root / "benchmarks")
    print_benchmarks(report, ui)
    report["index"] = write_index(root, ui)["files"]
    return jsonable(report)
