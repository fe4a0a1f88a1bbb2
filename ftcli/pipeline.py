"""The pipeline in a few straight lines, and run.json: prepare -> adapt -> train -> evaluate -> merge.

Every process of a multi-process run walks the same lines; only the main process writes files.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed

from ftcli.adapt import adapt, save_initial_adapter
from ftcli.data.chat import recipe_tokenizer
from ftcli.data.examples import SPLITS, prepare, save_prepared
from ftcli.data.lengths import resolve as resolve_length
from ftcli.data.lengths import with_data_length, with_max_length
from ftcli.data.prepared import data_table
from ftcli.data.store import load_data
from ftcli.data.tokenize import tokenize
from ftcli.distributed import check_launch, check_mode, is_sharded, process_group_kwargs
from ftcli.errors import FtcliError, Interrupted
from ftcli.evaluation.baseline import save_initial_head
from ftcli.evaluation.score import evaluate, source_groups, tokenize_aligned
from ftcli.memory import preflight
from ftcli.memory.arch import layer_dims
from ftcli.merge import merge
from ftcli.models import (
    load_reference,
    load_trained,
    resolve_device,
    to_device,
    weight_dtype_of,
)
from ftcli.precision import resolve_mixed_precision
from ftcli.recipe import PROMPT_KINDS, Recipe
from ftcli.rundir import (
    STUDY,
    check_same_data,
    clear_run,
    foreign_entries,
    open_run,
    read_run_record,
    write_run_json,
)
from ftcli.runlock import check_writable, run_lock
from ftcli.sources import trusting
from ftcli.testpoints import PAUSE, pause
from ftcli.tracking import finish as finish_tracking
from ftcli.tracking import start as start_tracking
from ftcli.tracking import trackers
from ftcli.train import train
from ftcli.train.objectives import PAIR_TASKS, evaluate_pairs
from ftcli.ui import UI, is_main_process, keep_library_log
from ftcli.util import atomic_write_text, remove_leftovers, versions


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunLog:
    """run.json: what happened, rewritten atomically after every stage."""

    def __init__(self, run_dir: Path, enabled: bool, base: dict | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.data: dict = dict(base or {})
        self.data.setdefault("timings_s", {})

    def update(self, **fields) -> None:
        self.data.update(fields)
        if self.enabled:
            write_run_json(self.run_dir, self.data)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.data["timings_s"][name] = round(time.perf_counter() - t0, 2)
        self.update()


def make_accelerator(recipe: Recipe, ui: UI | None = None):
    """The run's Accelerator and device; ``auto`` precision is measured here (cached per machine)
    and ``ui`` is told the choice and the ratio behind it."""
    device = resolve_device(recipe.train.device)
    mp = resolve_mixed_precision(
        recipe.train.mixed_precision,
        device,
        recipe,
        layer_dims(recipe) if recipe.train.mixed_precision == "auto" else None,
        weight_dtype_of(recipe, device),
        ui.info if ui is not None else None,
    )
    # One process may run several recipes (--seeds, cv, tests): accelerate keeps a singleton state
    # that would refuse a second precision. Forget the per-run part; the process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    check_launch(device)
    # no gradient_accumulation_steps: train() groups micro-batches itself, to normalise each
    # step's loss over its real targets; non-blocking copies pair with the pinned CUDA loader
    acc = Accelerator(
        mixed_precision=mp,
        cpu=device == "cpu",
        log_with=trackers(recipe) or None,
        kwargs_handlers=[process_group_kwargs(recipe.train.ddp_timeout_s)],
        dataloader_config=DataLoaderConfiguration(non_blocking=device == "cuda"),
    )
    check_mode(acc)  # the launch got the mode it asked for (docs/traps.md#fsdp-on-a-cpu-host)
    return acc, device


def _with_saved_length(recipe: Recipe, saved: Path) -> Recipe:
    """A resumed ``max_length: auto`` recipe takes the number its run chose (recipe.yaml holds it)."""
    if recipe.data.max_length != "auto":
        return recipe
    import yaml

    doc = yaml.safe_load(saved.read_text()) or {}
    ml = (doc.get("data") or {}).get("max_length")
    return with_max_length(recipe, ml) if isinstance(ml, int) else recipe


def _check_run_dir(recipe: Recipe, resume: bool, force: bool) -> Recipe:
    """Refuse a run folder the run could damage; returns the recipe to run (a resume's keeps the
    max_length its run chose)."""
    run_dir = recipe.run_dir
    record = read_run_record(run_dir)
    if resume:
        if record is None:
            raise FtcliError(
                f"nothing to resume: {run_dir} holds no run", hint="start it without --resume"
            )
        saved = run_dir / "recipe.yaml"
        if saved.exists():
            recipe = _with_saved_length(recipe, saved)
            if saved.read_text() != recipe.to_yaml():
                raise FtcliError(
                    f"the recipe differs from the one {run_dir} was started with",
                    hint=f"resume with the saved one: ftcli train {saved} --resume",
                )
        return recipe
    foreign = foreign_entries(run_dir)
    if foreign:  # ftcli deletes only what it wrote: not even --force overrides this
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise FtcliError(
            f"{run_dir} holds files ftcli did not write ({shown}); a run there could mix with "
            "or replace them",
            hint="--set name=NEW (or --set output_dir=DIR) to train into a new folder",
        )
    if record is not None and not force:
        if record.status == "failed" and not any((run_dir / "checkpoints").glob("step-*")):
            return recipe  # a run that failed before saving anything holds nothing to lose
        raise FtcliError(
            f"{run_dir} already holds a run (status: {record.status}); it would be overwritten",
            hint="--resume continues it, --force starts it over, --set name=NEW makes a new run",
        )
    leftovers = sorted(e.name for e in run_dir.iterdir()) if run_dir.is_dir() else []
    if record is None and not force and [e for e in leftovers if e != STUDY]:
        raise FtcliError(
            f"{run_dir} holds the start of a run that never recorded itself "
            f"({', '.join(leftovers[:5])}); it would be overwritten",
            hint="--force starts it over (only ftcli's own files there are removed; a tune "
            "study is kept), --set name=NEW makes a new run",
        )
    return recipe


def run_fields(
    recipe: Recipe, acc, device: str, prepared, tokenized, adapted, started: str | None
) -> dict:
    """What run.json records about a run before training starts."""
    vers = versions()
    counts = {s: tokenized[s].record() for s in SPLITS}  # a streamed split: what was measured
    return dict(
        ftcli_version=vers["ftcli"],
        name=recipe.name,
        task=recipe.task,
        method=recipe.method.kind,
        status="running",
        pid=os.getpid(),  # with host: a "running" run whose process is gone reads as killed
        host=socket.gethostname(),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        started=started or now(),
        versions=vers,
        seed=recipe.train.seed,
        device=device,
        num_processes=acc.num_processes,
        mixed_precision=acc.mixed_precision,
        threads=torch.get_num_threads(),
        data={**prepared.stats, "tokenized": counts},
        params=adapted.counts.as_dict(),
    )


def train_run(
    recipe: Recipe,
    ui: UI,
    resume: bool = False,
    force: bool = False,
    memory_check: bool = True,
    score_split: str = "test",
    pruning=None,
) -> dict:
    """Run the whole pipeline for ``recipe``; return run.json's contents.

    Data and model are loaded before anything is written, so a bad dataset or model name leaves
    no run folder behind. The output folder is checked writable and the run folder locked first.
    A study's trial (``ftcli tune``) scores ``score_split="validation"`` instead of the sealed test
    split, skips the merge (it reads test inputs), and passes its ``train.Pruning`` record to the
    loop.
    """
    for w in recipe.warnings:
        ui.warn(w.render())
    check_writable(Path(recipe.output_dir))
    # the user's own recipe is what may allow a model's code to run (trust_remote_code)
    with (
        trusting(recipe.model.trust_remote_code),
        run_lock(recipe.run_dir, enabled=is_main_process()) as held,
    ):
        if held is not None and held.took_over:
            ui.warn(
                f"took over the lock of {recipe.run_dir} from a run that is gone "
                f"({held.took_over}): it was killed or crashed"
            )
        return _train_run(recipe, ui, resume, force, memory_check, score_split, pruning)


def _how_it_stopped(status: str) -> str:
    return {
        "interrupted": "interrupted (Ctrl-C or SIGTERM; a checkpoint was saved)",
        "killed": "killed (kill -9, a crash or a power cut: it stopped without a word)",
        "failed": "failed",
    }.get(status, status)


def _train_run(
    recipe: Recipe,
    ui: UI,
    resume: bool,
    force: bool,
    memory_check: bool,
    score_split: str,
    pruning,
) -> dict:
    """The stages in order: check, load (data, model), write the run's start, train, evaluate,
    merge, benchmarks; run.json records each as it ends."""
    recipe = _check_run_dir(recipe, resume, force)
    acc, device = make_accelerator(recipe, ui)
    auto = recipe.data.max_length == "auto"  # the estimate needs the length the data decides
    if not auto:
        ui.step("memory   estimate before loading anything")
        memory = preflight(recipe, device, ui, enforce=memory_check, processes=acc.num_processes)
    set_seed(recipe.train.seed)
    timings: dict[str, float] = {}
    recipe, tokenizer, model_dir, prepared, tokenized = _prepare_stage(recipe, acc, ui, timings)
    if auto:
        ui.step("memory   estimate before loading the model")
        memory = preflight(recipe, device, ui, enforce=memory_check, processes=acc.num_processes)
    adapted = _adapt_stage(
        recipe, acc, device, model_dir, tokenizer, prepared, tokenized, ui, timings
    )
    # Everything loaded: now the run folder is written.
    previous = read_run_record(recipe.run_dir).model_dump() if resume else {}
    if acc.is_main_process:
        prepared = _write_start(recipe, resume, prepared, adapted)
    acc.wait_for_everyone()
    log = _start_log(recipe, acc, device, prepared, tokenized, adapted, previous, timings, ui)
    if memory:
        log.update(memory=memory)
    sealed = score_split == "test"
    test_metrics: dict = {}
    try:
        tracked = start_tracking(acc, recipe, adapted.counts.trainable)
        if tracked:
            log.update(tracking=tracked)
        trained = _train_stage(recipe, acc, device, adapted, tokenized, resume, pruning, log, ui)
        test_metrics = _evaluate_stage(
            recipe, acc, adapted, tokenizer, prepared, tokenized, score_split, log, ui
        )
        if recipe.method.kind in PROMPT_KINDS:
            ui.info(
                f"  no merge: {recipe.method.kind} tuning learns virtual tokens, no weights to "
                f"fold; the adapter is used as it is (ftcli predict {recipe.run_dir})"
            )
        elif sealed and recipe.merge.enabled and recipe.method.kind != "full":
            test_feats = tokenized["test"].features[:16]
            if recipe.task in PAIR_TASKS:  # the merge is verified on the chosen sequences
                test_feats = [
                    {
                        "input_ids": f["chosen_input_ids"]
                        if "chosen_input_ids" in f
                        else f["input_ids"]
                    }
                    for f in test_feats
                ]
            del adapted
            gc.collect()
            acc.free_memory()
            _merge_stage(recipe, acc, test_feats, log, ui)
        if recipe.eval.benchmarks:
            _benchmark_stage(recipe, acc, log, ui)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, Interrupted | KeyboardInterrupt) else "failed"
        log.update(
            status=status, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        )
        finish_tracking(acc, recipe, log.data.get("train", {}).get("steps", 0), {}, failed=True)
        raise
    log.data.pop("error", None)  # an earlier attempt's, now resumed to completion
    log.update(status="completed", finished=now())
    finish_tracking(acc, recipe, trained.steps, test_metrics)
    merged_dir = (
        sealed and recipe.merge.enabled and recipe.method.kind not in ("full", *PROMPT_KINDS)
    )
    ui.info(
        f"[green]done[/] {recipe.run_dir}/  (run.json, metrics.jsonl, "
        f"{'model/' if recipe.method.kind == 'full' else 'adapter/'}"
        f"{', merged/' if merged_dir else ''})"
    )
    return log.data


def _prepare_stage(recipe: Recipe, acc, ui: UI, timings: dict):
    """The data: read, split, cleaned, max_length resolved (auto: from the training split,
    data/lengths.py) and tokenized through the data cache (``data.store``: once per content, by
    each node's main process; the others open its files); with the recipe holding that int (what
    recipe.yaml records), the tokenizer and the local folder the model loads from. Model-written
    paraphrases are not cached."""
    ui.step(f"prepare  {recipe.data.where}")
    t0 = time.perf_counter()
    with acc.main_process_first():
        tokenizer, _, model_dir = recipe_tokenizer(recipe)
    if recipe.data.augment and recipe.data.augment.paraphrase:
        # a model writes them on each run: prepared here, in every process, as before
        from ftcli.data.paraphrase import add_paraphrases
        from ftcli.serve.predictor import load_predictor

        prepared = add_paraphrases(prepare(recipe), recipe, load_predictor, ui)
        recipe, length = resolve_length(
            recipe, prepared.splits["train"], tokenizer, prepared.label2id
        )
        prepared.stats["max_length"] = length.as_dict()  # run.json's data section records it
        tokenized = {
            s: tokenize(prepared.splits[s], recipe, tokenizer, prepared.label2id) for s in SPLITS
        }
        note = "not cached: data.augment.paraphrase has a model write the training copies"
    else:
        prepared, tokenized, note = load_data(recipe, tokenizer, model_dir, acc, ui)
    recipe = with_data_length(recipe, prepared, ui)
    timings["prepare"] = round(time.perf_counter() - t0, 2)
    ui.info(f"  {note}")
    ui.table("data", data_table(prepared, tokenized, recipe.data.max_length))
    for line in prepared.stats.get("notes", []):
        ui.warn(line)
    return recipe, tokenizer, model_dir, prepared, tokenized


def _adapt_stage(
    recipe: Recipe, acc, device, model_dir, tokenizer, prepared, tokenized, ui, timings
):
    """The model with the recipe's method attached, and what it trains."""
    ui.step(f"adapt    {recipe.model.name} ({recipe.method.kind})")
    t0 = time.perf_counter()
    adapted = adapt(
        recipe,
        tokenizer,
        model_dir,
        prepared.labels,
        device,
        acc.local_process_index,
        tokenized["train"].features,
    )
    timings["adapt"] = round(time.perf_counter() - t0, 2)
    for line in adapted.counts.lines(recipe):
        ui.info("  " + line)
    return adapted


def _write_start(recipe: Recipe, resume: bool, prepared, adapted):
    """The run folder as training starts it (main process): a fresh start clears the run's own
    entries, a resume checks the data and clears the stopped process' temporary files."""
    run_dir = recipe.run_dir
    if resume:
        check_same_data(prepared, run_dir / "data")
        remove_leftovers(run_dir, skip=(STUDY,))  # temp folders of the process that stopped
    elif run_dir.exists():
        clear_run(run_dir)  # the run's own entries; a tune study beside them stays
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_library_log(run_dir / "libraries.log")  # the libraries' warnings, off the screen
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    prepared = save_prepared(prepared, run_dir / "data")
    if recipe.task in ("classification", "reward") and not resume:
        # the fresh head as training found it: `ftcli eval --baseline` compares against this start
        save_initial_head(adapted.model, run_dir)
    save_initial_adapter(adapted.model, recipe, run_dir)  # PiSSA/OLoRA: converted at save
    return prepared


def _start_log(recipe, acc, device, prepared, tokenized, adapted, previous, timings, ui) -> RunLog:
    """run.json at the start: the run's fields, the load timings, and a resume's record."""
    log = RunLog(recipe.run_dir, acc.is_main_process, previous)
    log.data["timings_s"].update(timings)
    log.update(
        **run_fields(recipe, acc, device, prepared, tokenized, adapted, previous.get("started"))
    )
    if previous:
        found = previous.get("status", "unknown")
        log.update(
            resumes=[
                *previous.get("resumes", []),
                {"at": now(), "found_status": found, "how_it_stopped": _how_it_stopped(found)},
            ]
        )
        ui.info(f"  resuming a run that was {_how_it_stopped(found)}")
    t = recipe.train
    log.update(effective_batch_size=t.batch_size * t.gradient_accumulation * acc.num_processes)
    return log


def _train_stage(recipe, acc, device, adapted, tokenized, resume, pruning, log, ui):
    t = recipe.train
    ui.step(
        f"train    on {acc.num_processes} process(es), {device}, mixed precision {acc.mixed_precision}"
    )
    ui.info(
        f"  effective batch size {log.data['effective_batch_size']} = {t.batch_size} per process x "
        f"{t.gradient_accumulation} accumulation x {acc.num_processes} process(es)"
    )
    reference = None
    if recipe.task == "preference":  # a frozen reference model, loaded only if the run needs one
        reference = partial(
            load_reference,
            recipe,
            adapted.model_dir,
            adapted.tokenizer,
            acc.device.type,
            acc.local_process_index,
        )
    with log.stage("train"):
        trained = train(
            recipe,
            acc,
            adapted,
            tokenized,
            recipe.run_dir,
            resume=resume,
            progress=ui.progress(),
            pruning=pruning,
            load_reference=reference,
        )
    log.update(train=trained.as_dict())
    return trained


def _evaluate_stage(recipe, acc, adapted, tokenizer, prepared, tokenized, split, log, ui) -> dict:
    """Score the trained model on ``split`` (main process); returns its metrics."""
    ui.step("evaluate on the sealed test split" if split == "test" else f"evaluate on {split}")
    metrics: dict = {}
    with log.stage("evaluate"):
        if acc.is_main_process:
            # on CUDA, scored under the autocast it trained in (flash-attention refuses float32;
            # bf16 base weights meet a float32 head); on the CPU in float32, as `ftcli eval` does
            model = acc.unwrap_model(adapted.model, keep_fp32_wrapper=False)
            if is_sharded(acc):  # the sharded model runs only with every rank: reload it whole
                model = to_device(load_trained(recipe.run_dir, recipe.task)[0], acc.device)
            if recipe.task in PAIR_TASKS:  # held-out pair accuracy (train/objectives.py)
                return _evaluate_pairs(recipe, acc, model, tokenizer, tokenized, split, log, ui)
            with acc.autocast() if acc.device.type == "cuda" else nullcontext():
                report = evaluate(
                    recipe.task,
                    model,
                    tokenizer,
                    tokenized[split].features,
                    prepared.labels,
                    recipe.eval.batch_size,
                    acc.device,
                    split,
                )
            ui.table(
                split,
                [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in report.metrics.items()]
                + [("examples", report.n)],
            )
            log.update(eval=report.as_dict())
            metrics = report.metrics
    return metrics


def _evaluate_pairs(recipe, acc, model, tokenizer, tokenized, split, log, ui) -> dict:
    """A preference or reward run's held-out pairs: how often the trained model ranks the chosen
    answer first (a reward model by its score, a policy by its own log-probs), and the mean
    margin. The paired comparison with the start model is ``ftcli eval --baseline``'s part."""
    feats = tokenized[split].features if split in tokenized else []
    with acc.autocast() if acc.device.type == "cuda" else nullcontext():
        metrics = evaluate_pairs(
            recipe.task, model, feats, tokenizer.pad_token_id, recipe.eval.batch_size, acc.device
        )
    if not metrics:
        ui.info(f"  no {split} pairs to score (KTO rows are unpaired): evaluation skipped")
        return {}
    n = metrics.pop("pairs")
    ui.table(split, [(k, f"{v:.4f}") for k, v in metrics.items()] + [("pairs", n)])
    log.update(eval={"split": split, "n": n, "metrics": metrics})
    return metrics


def _merge_stage(recipe: Recipe, acc, test_feats, log: RunLog, ui: UI) -> None:
    ui.step("merge    adapter into the base, verified")
    run_dir = recipe.run_dir
    with log.stage("merge"):
        if PAUSE:
            pause("merge")
        if acc.is_main_process:
            merged = merge(
                run_dir / "adapter",
                run_dir / "merged",
                dtype=recipe.merge.dtype,
                into=recipe.merge.into,
                samples=test_feats,
                force=True,
            )
            ui.info(
                f"  merged/: max logit difference {merged.max_logit_diff:.1e} on {merged.samples} "
                f"test inputs; predictions agree {merged.prediction_agreement:.0%}"
            )
            log.update(merge=merged.as_dict())
    acc.wait_for_everyone()


def _benchmark_stage(recipe: Recipe, acc, log: RunLog, ui: UI) -> None:
    ui.step(f"benchmarks {', '.join(recipe.eval.benchmarks)}: base vs fine-tuned")
    with log.stage("benchmarks"):
        if acc.is_main_process:
            from ftcli.evaluation.benchmark import benchmark_run

            bench = benchmark_run(
                recipe.run_dir,
                recipe.eval.benchmarks,
                ui,
                tasks_path=recipe.eval.benchmarks_path and Path(recipe.eval.benchmarks_path),
                limit=recipe.eval.benchmark_limit,
            )
            log.update(benchmarks=bench["significance"])
    acc.wait_for_everyone()


def evaluate_run(run_dir: Path, ui: UI, split: str = "test") -> dict:
    """Re-score a finished run on a split, from the run folder alone."""
    rd = open_run(run_dir)
    recipe, prepared = rd.recipe, rd.prepared
    if recipe.task in PAIR_TASKS:
        raise FtcliError(
            f"{run_dir} is a task {recipe.task} run: `ftcli eval` does not score pairs yet",
            hint="its held-out pair accuracy is in run.json (eval), written when it trained",
        )
    if not prepared.splits.get(split):
        raise FtcliError(
            f"{run_dir} has no {split!r} split",
            hint=f"choose one of: {', '.join(k for k, v in prepared.splits.items() if v)}",
        )
    model, tokenizer = load_trained(run_dir, recipe.task)
    examples = prepared.splits[split]
    groups = source_groups(examples)  # a mixture's split: the metrics per source too
    if groups is None:
        feats = tokenize(examples, recipe, tokenizer, prepared.label2id).features
    else:
        feats, kept = tokenize_aligned(list(examples), recipe, tokenizer, prepared.label2id)
        groups = [groups[i] for i in kept]
    device = resolve_device("auto")
    to_device(model, device)
    report = evaluate(
        recipe.task,
        model,
        tokenizer,
        feats,
        prepared.labels,
        recipe.eval.batch_size,
        device,
        split,
        groups,
    )
    ui.table(
        f"{split} ({run_dir})",
        [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in report.metrics.items()],
    )
    if report.by_source:
        names = [k for k in next(iter(report.by_source.values())) if k != "n"]
        ui.table(
            f"{split} by source",
            [
                (g, m["n"], *(f"{m[k]:.4f}" if isinstance(m[k], float) else m[k] for k in names))
                for g, m in report.by_source.items()
            ],
            headers=("source", "examples", *names),
        )
    return report.as_dict()
