"""What ``ftcli eval``'s flags ask for: one split of one run, an ensemble, or a comparison
(``--baseline`` and/or ``--benchmark``); a combination that means nothing is one FtcliError,
raised before any model loads."""

from __future__ import annotations

from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.evaluation.compare import BASELINE_KINDS, eval_baseline
from ftcli.ui import UI


def check_run_to_score(baseline: list[str] | None, given: bool) -> None:
    """``--baseline RUN_DIR`` names the run compared with: without a run folder to score (``given``)
    it would silently score the latest run against it."""
    named = [b for b in baseline or [] if b not in ("default", *BASELINE_KINDS)]
    if not given and named:
        raise FtcliError(
            f"--baseline {named[0]} names the run to compare with, but not the run to score",
            hint=f"give both: ftcli eval RUN_DIR --baseline {named[0]}",
        )


def check_generation(generation: dict, baseline: list[str] | None) -> None:
    """--judge and its options compare a preference run's answers with its start's: they need
    --baseline."""
    stray = [k for k, v in generation.items() if v is not None]
    if stray and not baseline:
        raise FtcliError(
            f"--{stray[0].replace('_', '-')} applies with --baseline (start vs tuned answers, judged)",
            hint="ftcli eval RUN --baseline --judge JUDGE_RUN",
        )


def eval_mode(
    runs: int,
    baseline: list[str] | None,
    benchmark: list[str] | None,
    ensemble: bool,
    split: str,
    bench_only: dict[str, object],
) -> str:
    """``ensemble``, ``split`` (score one split of one run) or ``compare`` (--baseline and/or
    --benchmark) for ``runs`` run folders; ``bench_only`` maps the --benchmark-only flags to their
    values (None when not given)."""
    stray = [k for k, v in bench_only.items() if v is not None]
    if stray and not benchmark:
        raise FtcliError(
            f"{', '.join(stray)} applies to --benchmark only", hint="add --benchmark TASK"
        )
    if ensemble:
        if runs < 2:
            raise FtcliError(
                "--ensemble needs at least two run folders",
                hint="ftcli eval runs/A runs/B --ensemble",
            )
        if baseline or benchmark:
            raise FtcliError(
                "--ensemble compares the ensemble with its members; it takes no --baseline or --benchmark"
            )
        return "ensemble"
    if runs > 1:
        raise FtcliError(
            f"{runs} run folders given: evaluate one, or several with --ensemble",
            hint="to compare two runs: ftcli eval runs/A --baseline runs/B",
        )
    if not baseline and not benchmark:
        return "split"
    if split != "test":
        raise FtcliError(
            "--baseline and --benchmark compare on the sealed test split only", hint="drop --split"
        )
    return "compare"


def compare_run(
    run_dir: Path,
    ui: UI,
    baseline: list[str] | None,
    benchmark: list[str] | None,
    out: Path | None,
    tasks_path: Path | None,
    limit: int | None,
    num_fewshot: int | None,
    resamples: int,
    seed: int,
    robustness: bool,
    generation: dict | None = None,
) -> dict:
    """``--baseline`` and/or ``--benchmark`` on one run: the baseline report's record, with the
    benchmarks' under ``benchmarks`` (or the benchmarks' alone). ``generation``: a preference
    run's --judge options (evaluation/preference.py), which need --baseline."""
    result: dict = {}
    if baseline:
        result = eval_baseline(
            run_dir, baseline, ui, out, resamples, seed, robustness, generation=generation
        )
    if benchmark:
        from ftcli.evaluation.benchmark import benchmark_run  # lm-eval: only when asked for

        bench = benchmark_run(
            run_dir, benchmark, ui, out, tasks_path, limit, num_fewshot, resamples, seed
        )
        result = {**result, "benchmarks": bench} if baseline else bench
    return result
