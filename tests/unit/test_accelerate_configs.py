"""Every launch file in configs/accelerate/ parses with accelerate's own config classes, and the
environment `accelerate launch` would give the processes builds the plugin/state the file claims.
No GPU needed: this stops before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def _launch_env(name: str, *extra: str) -> tuple[object, dict]:
    """(parsed launch args, child environment) exactly as `accelerate launch` computes them."""
    parser = launch_command_parser()
    port = [] if "--machine_rank" in extra else ["--main_process_port", "0"]  # any free port
    args = parser.parse_args(["--config_file", str(CONFIGS / name), *port, *extra, "-m", "ftcli"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # what launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_every_config_file_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {
        "single-gpu.yaml",
        "multi-gpu.yaml",
        "fsdp2.yaml",
        "deepspeed-zero2.yaml",
        "deepspeed-zero3.yaml",
        "multi-node.yaml",
    }


def test_fsdp2_config_gives_fsdp2_with_full_state_dict(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    cfg = load_config_from_file(str(CONFIGS / "fsdp2.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP
    args, env = _launch_env("fsdp2.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()  # reads the launch environment, as each rank does
    assert plugin.fsdp_version == 2
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.auto_wrap_policy == "transformer_based_wrap" or callable(plugin.auto_wrap_policy)
    # and ftcli's QLoRA loader sees it: 4-bit weights stored in the compute dtype
    # (docs/traps.md#qlora-under-fsdp)
    import torch

    from ftcli.models import quantization_config
    from ftcli.recipe import QuantSpec

    qc = quantization_config(QuantSpec(compute_dtype="bfloat16"))
    assert qc.bnb_4bit_quant_storage == torch.bfloat16
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert quantization_config(QuantSpec()).bnb_4bit_quant_storage == torch.uint8


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_give_their_zero_stage(stage):
    name = f"deepspeed-zero{stage}.yaml"
    cfg = load_config_from_file(str(CONFIGS / name))
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    assert cfg.deepspeed_config["zero_stage"] == stage
    args, env = _launch_env(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if stage == 3:
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


def test_multi_node_config_gives_torchrun_two_nodes():
    cfg = load_config_from_file(str(CONFIGS / "multi-node.yaml"))
    assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.num_machines == 2
    args, env = _launch_env("multi-node.yaml", "--machine_rank", "1")
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "10.0.0.1:29500"  # torchrun's rendezvous on node 0
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def test_slurm_example_launches_the_multi_node_config():
    text = (CONFIGS.parent / "slurm" / "multi-node.sbatch").read_text()
    assert "configs/accelerate/multi-node.yaml" in text and "--machine_rank" in text
    assert "--kill-on-bad-exit=1" in text
