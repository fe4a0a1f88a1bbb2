"""Mixed precision by measurement (ftcli.precision): the decision on given timings, the cache
per machine, explicit values winning, the printed line; and the dtype/attention/device choices
the CUDA path makes, with torch.cuda's answers simulated (no GPU here)."""

from __future__ import annotations

import json

import pytest
import torch

from ftcli import models, precision
from ftcli.errors import FtcliError
from tests.conftest import tiny_recipe

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC Test\nflags\t\t: fpu sse avx2 fma\n"
AMX = "processor\t: 0\nmodel name\t: AMD EPYC Test\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n"


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """time_matmuls replaced by given timings (counting its runs), and a cache of its own."""
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(dims, tokens, device, half, budget_s=precision.BUDGET_S):
        calls.append((dims, tokens, device, half))
        return fake.fp32_s, fake.half_s, 0.3

    fake.fp32_s, fake.half_s = 1.0, 2.0
    monkeypatch.setattr(precision, "time_matmuls", fake)
    monkeypatch.setattr(precision, "_MEMO", {})
    fake.calls = calls
    return fake


@pytest.mark.parametrize(
    ("fp32_s", "half_s", "half", "want"),
    [
        (1.0, 2.0, "bf16", "no"),  # bf16 at half the speed: float32
        (1.0, 0.95, "bf16", "no"),  # 5% faster is within noise, and bf16 costs accuracy
        (1.0, 0.92, "bf16", "no"),  # 8.7%: still under the 10% margin
        (1.0, 0.9, "bf16", "bf16"),  # 1.11x: clear
        (1.0, 0.3, "fp16", "fp16"),  # a GPU without bf16 weighs fp16
        (0.0, 0.0, "bf16", "no"),  # nothing measured: stay float32
    ],
)
def test_decide_on_given_timings(fp32_s, half_s, half, want):
    assert precision.decide(fp32_s, half_s, half) == want


def test_auto_measures_once_then_reads_the_cache(timed):
    first = precision.measure_choice("cpu", None, (384, 1536), cpuinfo=AVX2)
    assert (first.mixed_precision, first.ratio, first.cached) == ("no", 0.5, False)
    assert len(timed.calls) == 1 and timed.calls[0][0] == (384, 1536)
    saved = json.loads(precision.cache_path().read_text())
    assert saved["version"] == precision.CACHE_VERSION and len(saved["entries"]) == 1
    (entry,) = saved["entries"].values()
    assert entry["native_bf16_flags"] is False  # the flags' claim, kept as a fact only

    precision._MEMO.clear()  # a new process: the file answers
    again = precision.measure_choice("cpu", None, (384, 1536), cpuinfo=AVX2)
    assert again.cached and again.mixed_precision == "no" and len(timed.calls) == 1


def test_a_changed_machine_or_model_measures_again(timed, monkeypatch):
    precision.measure_choice("cpu", None, (384, 1536), cpuinfo=AVX2)
    precision.measure_choice("cpu", None, (384, 1536), cpuinfo=AMX)  # other CPU flags
    assert len(timed.calls) == 2
    precision.measure_choice("cpu", None, (4096, 11008), cpuinfo=AVX2)  # other layer shapes
    assert len(timed.calls) == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # other thread count
    precision.measure_choice("cpu", None, (384, 1536), cpuinfo=AVX2)
    assert len(timed.calls) == 4
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch
    precision.measure_choice("cpu", None, (384, 1536), cpuinfo=AVX2)
    assert len(timed.calls) == 5


def test_flags_claiming_bf16_do_not_decide(timed):
    """AMX in the flags, bf16 measured slower: float32 (the guess used to pick bf16 here)."""
    assert precision.cpu_has_native_bf16(AMX)
    choice = precision.measure_choice("cpu", None, (384, 1536), cpuinfo=AMX)
    assert choice.mixed_precision == "no" and choice.native_bf16_flags is True


def test_a_damaged_cache_is_measured_over(timed):
    precision.cache_path().parent.mkdir(parents=True, exist_ok=True)
    precision.cache_path().write_text("{not json")
    assert precision.measure_choice("cpu", None, (8, 8)).mixed_precision == "no"
    assert json.loads(precision.cache_path().read_text())["entries"]


def test_explicit_values_win_and_fp16_needs_cuda(timed):
    assert precision.resolve_mixed_precision("no", "cpu") == "no"
    assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_mixed_precision("fp16", "cuda") == "fp16"
    assert not timed.calls  # nothing measured for an explicit value
    with pytest.raises(FtcliError, match="fp16 mixed precision needs a CUDA GPU"):
        precision.resolve_mixed_precision("fp16", "cpu")


def test_the_printed_line(timed):
    lines: list[str] = []
    assert precision.resolve_mixed_precision("auto", "cpu", None, (8, 8), say=lines.append) == "no"
    timed.fp32_s, timed.half_s = 1.0, 0.5
    precision._MEMO.clear()
    got = precision.resolve_mixed_precision("auto", "cpu", None, (16, 16), say=lines.append)
    precision._MEMO.clear()
    precision.resolve_mixed_precision("auto", "cpu", None, (16, 16), say=lines.append)
    assert got == "bf16"
    assert lines == [
        "mixed precision auto: no (bf16 0.50x float32 on this CPU, measured 0.3 s; cached)",
        "mixed precision auto: bf16 (bf16 2.00x float32 on this CPU, measured 0.3 s; cached)",
        "mixed precision auto: bf16 (bf16 2.00x float32 on this CPU, measured 0.3 s; "
        "from the cache)",
    ]


def test_bf16_weights_compute_in_bf16_whatever_the_timing(timed):
    lines: list[str] = []
    mp = precision.resolve_mixed_precision("auto", "cpu", None, (8, 8), "bfloat16", lines.append)
    assert mp == "bf16" and lines[0].endswith("bf16 all the same: the base weights are bf16")


def test_cuda_without_bf16_weighs_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.half_type("cuda") == "fp16"
    assert precision.half_type("cpu") == "bf16"


def test_cuda_key_names_the_gpu_and_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    key = precision.machine_key("cuda")
    assert "NVIDIA H100 80GB HBM3" in key and "cuda 12.8" in key


def test_a_real_measurement_is_short_and_positive():
    fp32_s, half_s, took = precision.time_matmuls((64, 256), 128, "cpu", "bf16", budget_s=0.2)
    assert fp32_s > 0 and half_s > 0 and took < 5


def test_the_token_rows_follow_the_recipe_capped():
    class R:
        class train:
            batch_tokens = None
            batch_size = 32

        class data:
            max_length = 64

    assert precision.token_rows(R, "cpu") == precision.CPU_TOKENS  # 2048 capped
    assert precision.token_rows(R, "cuda") == 2048
    assert precision.token_rows(None, "cpu") == precision.CPU_TOKENS


# --------------------------------------------------------------------------- weights dtype


def _fake_gpu(monkeypatch, bf16: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize(
    ("device", "mp", "method", "bf16", "want"),
    [
        ("cuda", "bf16", "lora", True, "bfloat16"),
        ("cuda", "bf16", "full", True, "float32"),  # float32 master weights for the optimizer
        ("cuda", "bf16", "qlora", True, "float32"),  # QLoRA sets its own dtypes
        ("cuda", "no", "lora", True, "float32"),  # no autocast: the fp32 head needs fp32 input
        ("cuda", "fp16", "lora", True, "float32"),
        ("cuda", "bf16", "lora", False, "float32"),  # a GPU without bf16
        ("cpu", "bf16", "lora", True, "float32"),
    ],
)
def test_auto_weight_dtype(device, mp, method, bf16, want):
    assert precision.auto_weight_dtype(device, mp, method, bf16) == want


def test_weight_dtype_of_a_recipe_on_a_simulated_gpu(monkeypatch):
    from ftcli.recipe import recipe_from_mapping

    def recipe(**over):
        base = {
            "name": "t",
            "task": "classification",
            "model": {"name": "/nonexistent", **over.get("model", {})},
            "data": {"path": "x.csv", "labels": ["a", "b"]},
            "method": {"kind": over.get("kind", "lora")},
            "train": over.get("train", {}),
        }
        return recipe_from_mapping(base)

    assert models.weight_dtype_of(recipe(), "cuda") == "float32"  # no GPU here
    _fake_gpu(monkeypatch)
    assert models.weight_dtype_of(recipe(), "cuda") == "bfloat16"
    assert models.weight_dtype_of(recipe(), "cpu") == "float32"
    assert models.weight_dtype_of(recipe(kind="full"), "cuda") == "float32"
    assert models.weight_dtype_of(recipe(train={"mixed_precision": "no"}), "cuda") == "float32"
    assert models.weight_dtype_of(recipe(model={"dtype": "float16"}), "cuda") == "float16"
    _fake_gpu(monkeypatch, bf16=False)
    assert models.weight_dtype_of(recipe(), "cuda") == "float32"


# --------------------------------------------------------------------------- inference attention


@pytest.mark.parametrize(
    ("choice", "device", "dtype", "want"),
    [
        ("flash_attention_2", "cuda", "bfloat16", "flash_attention_2"),
        ("flash_attention_2", "cuda", torch.float16, "flash_attention_2"),
        ("flash_attention_2", "cuda", "float32", "sdpa"),  # FA2 refuses float32
        ("flash_attention_2", "cpu", "bfloat16", "sdpa"),  # FA2 is CUDA-only
        ("flash_attention_2", "cpu", "float32", "sdpa"),  # the merge's float32 CPU load
        ("eager", "cpu", "float32", "eager"),
        ("sdpa", "cuda", "bfloat16", "sdpa"),
        (None, "cuda", "bfloat16", None),  # transformers' default
    ],
)
def test_inference_attention(choice, device, dtype, want):
    assert models.inference_attention(choice, device, dtype) == want


def test_inference_autocast_follows_the_weights():
    from ftcli.forward import inference_autocast

    fp32 = torch.nn.Linear(2, 2)
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2).bfloat16(), torch.nn.Linear(2, 2))
    assert not isinstance(inference_autocast(mixed, "cpu"), torch.autocast)  # scores stay fp32
    assert not isinstance(inference_autocast(fp32, "cuda"), torch.autocast)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        ctx = inference_autocast(mixed, torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- GPUs torch cannot use


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir()
    exe.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-L" ]; then\n'
        '  echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)"\n'
        '  echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0001)"\n'
        "fi\n"
    )
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_WARNED", set())
    monkeypatch.setattr(models, "_LISTED", {})
    return exe


def test_auto_warns_when_nvidia_smi_lists_gpus_torch_cannot_use(fake_nvidia_smi, capsys):
    assert models.listed_gpus() == [
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)",
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0001)",
    ]
    assert models.resolve_device("auto") == "cpu"
    err = capsys.readouterr().err
    assert err.startswith("warning: nvidia-smi lists 2 GPU(s) (GPU 0: NVIDIA H100")
    assert "running on the CPU" in err and "scripts/setup.sh" in err
    models.resolve_device("auto")
    assert capsys.readouterr().err == ""  # once per process


def test_cuda_names_the_likely_cause(fake_nvidia_smi, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(FtcliError, match="CPU-only build") as info:
        models.resolve_device("cuda")
    assert "setup.sh" in info.value.hint


def test_no_nvidia_smi_no_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_WARNED", set())
    assert models.resolve_device("auto") == "cpu"
    assert capsys.readouterr().err == ""


def test_a_failing_nvidia_smi_is_no_gpu(fake_nvidia_smi, capsys):
    fake_nvidia_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert models.listed_gpus() == []
    assert models.resolve_device("auto") == "cpu"
    assert capsys.readouterr().err == ""


def test_a_simulated_bf16_gpu_loads_the_base_in_bf16_and_trains_fp32(
    monkeypatch, tmp_path, tiny_models, tiny_data
):
    """model.dtype auto on a bf16 CUDA GPU: frozen base weights bf16, every trainable parameter
    (LoRA and the classifier head peft copies) float32; on the CPU all stays float32."""
    from ftcli.adapt import adapt
    from ftcli.models import load_tokenizer
    from ftcli.recipe import recipe_from_mapping

    mapping = tiny_recipe(tmp_path, tiny_models, tiny_data)
    mapping["train"]["mixed_precision"] = "auto"
    recipe = recipe_from_mapping(mapping)
    tok, _, model_dir = load_tokenizer(recipe.model)
    labels = ["negative", "positive"]

    cpu = adapt(recipe, tok, model_dir, labels, "cpu").model
    assert {p.dtype for p in cpu.parameters()} == {torch.float32}

    _fake_gpu(monkeypatch)  # adapt loads on the CPU; pipeline moves it: nothing touches CUDA
    gpu = adapt(recipe, tok, model_dir, labels, "cuda").model
    frozen = {p.dtype for p in gpu.parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in gpu.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert set(trained.values()) == {torch.float32}
    assert any("lora_" in n for n in trained) and any("modules_to_save" in n for n in trained)
