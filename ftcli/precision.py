"""Mixed precision and weight dtype, decided by measurement rather than by CPU flags.

``train.mixed_precision: auto`` times the model's own linear-layer shapes in float32 and in the
half type (bf16; fp16 on a CUDA GPU without bf16) for a fraction of a second, keeps the half type
only when it is clearly faster (bf16 also costs accuracy), and caches the answer per machine,
device and shapes in ``<cache_dir>/precision.json``. CPU flags proved a poor guide: a Xeon with
AVX512-BF16 but no AMX ran the quickstart at 0.55x in bf16 (docs/traps.md#bf16-on-cpus).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ftcli.errors import FtcliError

MARGIN = 0.10  # the half type must be at least this much faster (1.10x) to be chosen
CPU_TOKENS = 512  # token rows timed on a CPU (batch x max_length, capped to stay well under 1 s)
CUDA_TOKENS = 8192
CPU_FLOPS = 4e8  # work of one timed run on a CPU (~10-30 ms in float32): caps the rows
CPU_MAX_DIMS = (1024, 4096)  # a 7B's layer on a CPU: same kernels, a fraction of the time
CUDA_FLOPS = 2e12
MIN_ROWS = 32
INNER = 1  # products per timed run (more on CUDA would only hide launch overhead less)
BUDGET_S = 0.5  # measurement time to aim for; a slow half type takes it a little past
MIN_REPEATS, MAX_REPEATS = 1, 7
DEFAULT_DIMS = (1024, 4096)  # (hidden, intermediate) when no model config is at hand
CACHE_VERSION = 1
_MEMO: dict[str, Choice] = {}  # this process' answers: one measurement per key, one line printed


@dataclass
class Choice:
    """What ``auto`` resolved to, and the measurement behind it."""

    mixed_precision: str  # "no" | "bf16" | "fp16"
    half: str  # the half type that was timed: "bf16" or "fp16"
    ratio: float  # speed of the half type / speed of float32 (>1: half is faster)
    measured_s: float  # wall time the measurement took
    device: str  # "cpu" | "cuda"
    when: str
    native_bf16_flags: bool | None = None  # CPU only: the flags' claim, kept as a fact
    cached: bool = False  # read from the cache file (not measured by this call)

    def line(self) -> str:
        """The one line a run prints: the choice and the ratio that made it."""
        where = "this CPU" if self.device == "cpu" else "this GPU"
        source = "from the cache" if self.cached else "cached"
        return (
            f"mixed precision auto: {self.mixed_precision} ({self.half} {self.ratio:.2f}x float32 "
            f"on {where}, measured {self.measured_s:.1f} s; {source})"
        )


def decide(fp32_s: float, half_s: float, half: str = "bf16", margin: float = MARGIN) -> str:
    """The mixed precision to train in, from the median times of the same work in float32 and in
    the half type: the half type only when it is at least ``1 + margin`` times as fast."""
    if half_s <= 0 or fp32_s <= 0:
        return "no"
    return half if fp32_s / half_s >= 1 + margin else "no"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU flags claim native bf16 (AVX512-BF16 or AMX). Reported, never decisive: a
    CPU with AVX512-BF16 but no AMX still ran bf16 slower than fp32 (docs/traps.md#bf16-on-cpus)."""
    flags = _cpu_flags(cpuinfo)
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def _cpu_flags(cpuinfo: str | None = None) -> set[str]:
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return flags


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key(device: str, cpuinfo: str | None = None) -> str:
    """What the answer depends on besides the shapes: the CPU model, its flags, torch and the
    thread count; or the GPU's name, the CUDA build and torch."""
    if device == "cuda":
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        return f"cuda|{name}|cuda {torch.version.cuda}|torch {torch.__version__}"
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = hashlib.sha256(" ".join(sorted(_cpu_flags(cpuinfo))).encode()).hexdigest()[:12]
    return (
        f"cpu|{_cpu_model(cpuinfo)}|flags {flags}|torch {torch.__version__}"
        f"|threads {torch.get_num_threads()}"
    )


def half_type(device: str) -> str:
    """The half type ``auto`` weighs against float32: bf16, or fp16 on a CUDA GPU without bf16."""
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_matmuls(
    dims: tuple[int, int], tokens: int, device: str, half: str, budget_s: float = BUDGET_S
) -> tuple[float, float, float]:
    """(float32 median s, half median s, total s) of the block's largest linear layer (hidden ->
    intermediate): its forward and its input gradient's product, on at most ``tokens`` rows, with
    a float32 weight under autocast as accelerate runs it. On a CPU the rows (and a big model's
    dimensions) are capped so one float32 run takes milliseconds; the types alternate, so a neighbour's load hits both
    alike; repeats stop at the budget (a half type many times slower is clear after one)."""
    hidden, inter = dims
    if device != "cuda":
        hidden, inter = min(hidden, CPU_MAX_DIMS[0]), min(inter, CPU_MAX_DIMS[1])
    t_start = time.perf_counter()
    cap = CUDA_FLOPS if device == "cuda" else CPU_FLOPS
    rows = max(MIN_ROWS, min(tokens, int(cap / (4 * hidden * inter))))
    gen = torch.Generator().manual_seed(0)
    w = ((torch.rand(inter, hidden, generator=gen) - 0.5) / hidden**0.5).to(device)
    x = (torch.rand(rows, hidden, generator=gen) - 0.5).to(device)
    dtype = HALF[half]

    def run(kind: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=kind == "half"):
            for _ in range(INNER):
                y = torch.nn.functional.linear(x, w)  # forward
                torch.matmul(y, w)  # the input gradient's product
        _sync(device)
        return time.perf_counter() - t0

    run("fp32"), run("half")  # warm-up: kernels chosen, caches filled
    fp32, hf = [], []
    while len(fp32) < MAX_REPEATS and (
        len(fp32) < MIN_REPEATS or time.perf_counter() - t_start < budget_s
    ):
        fp32.append(run("fp32"))
        hf.append(run("half"))
    return statistics.median(fp32), statistics.median(hf), time.perf_counter() - t_start


def token_rows(recipe, device: str) -> int:
    """Rows to time: the recipe's batch_size x max_length, capped so the measurement stays short."""
    cap = CUDA_TOKENS if device == "cuda" else CPU_TOKENS
    if recipe is None:
        return cap
    t = recipe.train
    ml = recipe.data.max_length
    # max_length auto is chosen later, from the data: time at the cap's width meanwhile
    rows = t.batch_tokens or t.batch_size * (ml if isinstance(ml, int) else cap)
    return max(16, min(cap, int(rows)))


def cache_path() -> Path:
    from ftcli.sources import cache_dir

    return cache_dir() / "precision.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, key: str, choice: Choice) -> None:
    """Add one entry; a cache that cannot be written (read-only home) only costs a re-measurement."""
    from ftcli.util import atomic_write_text

    entries = _read_cache(path)
    entry = asdict(choice)
    entry.pop("cached", None)
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=2) + "\n"
        atomic_write_text(path, text)
    except (OSError, FtcliError):
        pass


def measure_choice(
    device: str, recipe=None, dims: tuple[int, int] | None = None, cpuinfo: str | None = None
) -> Choice:
    """What ``auto`` means here for a model's (hidden, intermediate) ``dims`` (read from its
    config: ftcli.memory.arch.layer_dims) at the recipe's batch: the cache's answer, else a fresh
    measurement (saved to the cache)."""
    half = half_type(device)
    dims, tokens = dims or DEFAULT_DIMS, token_rows(recipe, device)
    key = f"{machine_key(device, cpuinfo)}|{half}|{dims[0]}x{dims[1]}x{tokens}"
    if key in _MEMO:
        return _MEMO[key]
    path = cache_path()
    hit = _read_cache(path).get(key)
    if isinstance(hit, dict):
        try:
            choice = Choice(**{**hit, "cached": True})
        except TypeError:  # an entry of another layout: measure again
            choice = None
        if choice is not None:
            _MEMO[key] = choice
            return choice
    fp32_s, half_s, took = time_matmuls(dims, tokens, device, half)
    choice = Choice(
        mixed_precision=decide(fp32_s, half_s, half),
        half=half,
        ratio=round(fp32_s / half_s, 3) if half_s > 0 else 0.0,
        measured_s=round(took, 3),
        device=device,
        when=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        native_bf16_flags=cpu_has_native_bf16(cpuinfo) if device == "cpu" else None,
    )
    _write_cache(path, key, choice)
    _MEMO[key] = choice
    return choice


def resolve_mixed_precision(
    choice: str,
    device: str,
    recipe=None,
    dims: tuple[int, int] | None = None,
    weights: str = "float32",
    say=None,
) -> str:
    """The mixed precision a run trains in. An explicit value wins (fp16 needs CUDA); ``auto``
    is measured (``measure_choice``) and ``say`` (a one-line printer, such as ``UI.info``) is
    told what it chose and why. Base ``weights`` loaded in bf16 (``model.dtype: auto`` on a CUDA
    GPU) compute in bf16 whatever the timing: their float32 head and adapters need the autocast."""
    if choice == "fp16" and device != "cuda":
        raise FtcliError(
            "fp16 mixed precision needs a CUDA GPU", hint="set train.mixed_precision to bf16 or no"
        )
    if choice != "auto":
        return choice
    result = measure_choice(device, recipe, dims)
    chosen = result.mixed_precision
    if weights == "bfloat16" and chosen != "bf16":
        chosen = "bf16"
        if say is not None:
            say(result.line() + "; bf16 all the same: the base weights are bf16")
            say = None
    if say is not None:
        say(result.line())
    return chosen


def auto_weight_dtype(device: str, mixed_precision: str, method: str, bf16_capable: bool) -> str:
    """``model.dtype: auto``: bf16 on a bf16-capable CUDA GPU when the run computes in bf16
    (frozen base weights need no float32 copy; what trains is kept in float32, see
    ``models.upcast_trainable``), float32 everywhere else. Full fine-tuning keeps float32 master
    weights (an optimizer stepping bf16 weights loses small updates); QLoRA sets its own."""
    if (
        device == "cuda"
        and bf16_capable
        and mixed_precision == "bf16"
        and method not in ("full", "qlora")
    ):
        return "bfloat16"
    return "float32"


def resolve_weight_dtype(choice: str, device: str, mixed_precision: str, method: str) -> str:
    """The dtype the base loads in on this machine: an explicit choice, else ``auto_weight_dtype``
    with the GPU's own answer on bf16."""
    if choice != "auto":
        return choice
    capable = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return auto_weight_dtype(device, mixed_precision, method, capable)
