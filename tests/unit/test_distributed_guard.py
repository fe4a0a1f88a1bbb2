"""The guard: the distributed mode a process runs must be the one its launch asked for."""

from __future__ import annotations

import pytest

from ftcli.distributed import check_launch, check_mode
from ftcli.errors import FtcliError


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "var,name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_sharded_launch_on_a_cpu_stops_before_accelerate(clean_env, var, name):
    check_launch("cpu")  # nothing asked: nothing to check
    clean_env.setenv(var, "true")
    with pytest.raises(FtcliError) as exc:
        check_launch("cpu")
    assert exc.value.message == (
        f"the launch asked for {name} ({var}) but ftcli runs on cpu, where accelerate cannot shard"
    )
    assert "torchrun --nproc_per_node" in exc.value.hint
    check_launch("cuda")  # a GPU host may shard; check_mode then checks what accelerate built


def test_world_size_over_one_without_a_process_group_is_stopped(clean_env):
    from accelerate import Accelerator, PartialState

    PartialState(cpu=True)  # this process: one, not distributed (set up before WORLD_SIZE lies)
    acc = Accelerator(cpu=True)
    check_mode(acc)
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(FtcliError, match="WORLD_SIZE is 2 but accelerate runs NO with 1 process"):
        check_mode(acc)
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("ACCELERATE_USE_FSDP", "1")
    with pytest.raises(FtcliError, match=r"asked for FSDP \(ACCELERATE_USE_FSDP\) but accelerate"):
        check_mode(acc)
