"""Several processes: the guard that the launch got the mode it asked for, the process-group
timeout, and full (gathered) state dicts that work the same unwrapped, under DDP and under FSDP2.

The guard exists because the failure is silent (docs/traps.md#fsdp-on-a-cpu-host): ``accelerate
launch --use_fsdp`` on a host without GPUs gives every process ``DistributedType.NO``, so N
unsynchronised copies train and race on the same run folder.
"""

from __future__ import annotations

import datetime as dt
import os

from ftcli.errors import FtcliError

TRUE = {"1", "true", "yes", "on"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE


def process_group_kwargs(timeout_s: int):
    """accelerate's handler that sets the collective timeout (``train.ddp_timeout_s``)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=dt.timedelta(seconds=timeout_s))


def requested_mode() -> str | None:
    """What the launcher asked for, read from the environment accelerate/torchrun set."""
    if _env_true("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "DEEPSPEED"
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return "MULTI"
    return None


HINT = (
    "FSDP and DeepSpeed need CUDA GPUs (configs/accelerate/); on a CPU use "
    "torchrun --nproc_per_node N -m ftcli train RECIPE (DDP over gloo)"
)


def check_launch(device: str) -> None:
    """Before the Accelerator is built: a sharded launch on a device that cannot shard."""
    wanted = requested_mode()
    if wanted in ("FSDP", "DEEPSPEED") and device != "cuda":
        var = "ACCELERATE_USE_FSDP" if wanted == "FSDP" else "ACCELERATE_USE_DEEPSPEED"
        raise FtcliError(
            f"the launch asked for {'FSDP' if wanted == 'FSDP' else 'DeepSpeed'} ({var}) but "
            f"ftcli runs on {device}, where accelerate cannot shard",
            hint=HINT,
        )


def check_mode(accelerator) -> None:
    """Stop when the distributed mode running is not the one the launch asked for."""
    from accelerate.utils import DistributedType

    wanted = requested_mode()
    got = accelerator.distributed_type
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    problem = None
    if wanted == "FSDP" and got != DistributedType.FSDP:
        problem = f"the launch asked for FSDP (ACCELERATE_USE_FSDP) but accelerate runs {got.value}"
    elif wanted == "DEEPSPEED" and got != DistributedType.DEEPSPEED:
        problem = (
            f"the launch asked for DeepSpeed (ACCELERATE_USE_DEEPSPEED) but accelerate runs "
            f"{got.value}"
        )
    elif world > 1 and (got == DistributedType.NO or accelerator.num_processes != world):
        problem = (
            f"WORLD_SIZE is {world} but accelerate runs {got.value} with "
            f"{accelerator.num_processes} process(es)"
        )
    if problem:
        raise FtcliError(
            f"{problem}: the processes would train unsynchronised copies",
            hint=HINT,
        )


def is_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: parameters live in shards, saving must gather them."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def fsdp_requested() -> bool:
    """This process was launched for FSDP (read before the model loads: QLoRA needs to know)."""
    return _env_true("ACCELERATE_USE_FSDP")


def full_state_dict(model) -> dict:
    """The whole model's state, gathered to full CPU tensors on rank 0 (others get {}).

    Works on a plain module, a DDP-wrapped one and one sharded with FSDP2 ``fully_shard``; every
    rank must call it (it is a collective when the model is sharded).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def uses_deepspeed(accelerator) -> bool:
    """accelerate runs DeepSpeed: its engine steps, clips and scales the loss itself."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED


def zero3_requested() -> bool:
    """This process was launched for DeepSpeed ZeRO-3 (read before the model loads: a 4-bit base
    must not get a device_map, and stores its weights in the compute dtype)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"].strip() == "3"
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()  # a config file's stage, once the Accelerator exists


def deepspeed_settings(t, world: int) -> dict:
    """The DeepSpeed config values a recipe's ``train`` section (``t``) decides: ftcli prepares no
    dataloader, so accelerate cannot fill the micro-batch size's "auto"; the engine must know the
    accumulation to step once per group; its clipping is train.max_grad_norm (0: none)."""
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": t.batch_size * t.gradient_accumulation * world,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
    }


def configure_deepspeed(accelerator, t) -> dict | None:
    """Before ``accelerator.prepare``: the DeepSpeed plugin's config from the recipe (whatever the
    accelerate config file said: the recipe wins, so a run means the same under every launcher),
    and accelerate's accumulation to match (it warns and takes the config's otherwise). Returns
    the values set; None when DeepSpeed is not running."""
    if not uses_deepspeed(accelerator):
        return None
    plugin = accelerator.state.deepspeed_plugin
    values = deepspeed_settings(t, accelerator.num_processes)
    plugin.deepspeed_config.update(values)
    plugin.gradient_accumulation_steps = values["gradient_accumulation_steps"]
    plugin.gradient_clipping = values["gradient_clipping"]
    accelerator.gradient_accumulation_steps = values["gradient_accumulation_steps"]
    return values


def place(model, accelerator):
    """The model on the accelerator's device before its optimizer is built (fused AdamW needs it
    there). Sharded launches place their shards in ``prepare``; a quantized base is already where
    its device_map put it."""
    if is_sharded(accelerator) or getattr(model, "hf_device_map", None):
        return model
    return model.to(accelerator.device)
