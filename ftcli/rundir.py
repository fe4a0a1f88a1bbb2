"""The run folder and the typed records that cross disk, each read in one place.

```text
runs/<name>/
  recipe.yaml     the resolved recipe            -> Recipe        (load_recipe)
  data/           the sealed splits              -> PreparedData  (data.examples.load_prepared)
  run.json        what happened                  -> RunRecord     (read_run_record)
  adapter/|model/ the trained weights + ftcli.json -> ModelRecord (read_model_record)
  merged/         the merged model + merge.json  -> MergeRecord   (read_merge_record)
```

Old run folders stay readable: every field a record gained later has a default, and the defaults
of a method's settings come from the recipe schema, never restated here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from ftcli.data.examples import PreparedData, load_prepared
from ftcli.data.rows import jsonl_digest
from ftcli.errors import FtcliError
from ftcli.recipe import MethodSpec, ModelSpec, QuantSpec, Recipe, load_recipe
from ftcli.util import read_json, write_json

# --------------------------------------------------------------------------- ftcli.json


class ModelRecord(BaseModel):
    """What a trained folder (adapter/ or model/) was trained from: ``ftcli.json``, completed from
    peft's adapter_config.json or transformers' config.json for folders ftcli did not write."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    base_model: str | None = None
    base_model_dir: str | None = None
    model: ModelSpec | None = (
        None  # how the base was loaded (revision, dtype); absent in old records
    )
    # a preference run's model is a causal LM (predict, chat, serve and merge read it as one);
    # a reward model is a one-logit sequence classifier
    task: Literal["classification", "causal_lm", "reward"]
    method: MethodSpec
    steps: int | None = None
    labels: list[str] | None = None
    lora: dict | None = None  # r, alpha, targets as peft saved them (adapters only; not stored)
    sha256: dict[str, str] | None = None  # of the folder's *.safetensors, checked before loading

    @property
    def kind(self) -> str:
        return self.method.kind

    @property
    def quant(self) -> QuantSpec:
        return self.method.quant

    @property
    def revision(self) -> str | None:
        return self.model.revision if self.model else None

    def to_json(self) -> dict:
        d = self.model_dump(mode="json", exclude={"lora"})
        if self.kind == "qlora":
            d["method"]["quantization"] = self.quant.model_dump(mode="json")
        return d


def model_record_for(
    recipe: Recipe, model_dir: str, steps: int, labels: list[str] | None
) -> ModelRecord:
    """The record ``train`` writes beside the trained weights."""
    return ModelRecord(
        base_model=recipe.model.name,
        base_model_dir=model_dir,
        model=recipe.model,
        task="causal_lm" if recipe.task == "preference" else recipe.task,
        method=recipe.method,
        steps=steps,
        labels=labels if recipe.task == "classification" else None,
    )


def write_model_record(folder: Path, rec: ModelRecord) -> None:
    write_json(Path(folder) / "ftcli.json", rec.to_json())


def _task_of_config(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return "causal_lm"


def read_model_record(folder: Path) -> ModelRecord:
    """The record of an adapter folder or a full model folder (a merged folder reads as one too)."""
    folder = Path(folder)
    rec = read_json(folder / "ftcli.json") if (folder / "ftcli.json").exists() else {}
    if (folder / "adapter_config.json").exists():
        cfg = read_json(folder / "adapter_config.json")
        rec.setdefault("base_model", cfg.get("base_model_name_or_path"))
        rec.setdefault("base_model_dir", cfg.get("base_model_name_or_path"))
        rec.setdefault(
            "task", "classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
        )
        rec.setdefault("method", {"kind": "lora"})
        rec["lora"] = {
            "r": cfg.get("r"),
            "alpha": cfg.get("lora_alpha"),
            "target_modules": cfg.get("target_modules"),
            "modules_to_save": cfg.get("modules_to_save"),
        }
    else:
        merged = read_merge_record(folder) if (folder / "merge.json").exists() else None
        cfg = read_json(folder / "config.json") if (folder / "config.json").exists() else {}
        rec.setdefault("task", merged.task if merged else _task_of_config(cfg))
        rec.setdefault("method", {"kind": "full"})
        rec.setdefault("base_model", merged.base_model if merged else str(folder))
        if rec["task"] == "classification" and not rec.get("labels") and cfg.get("id2label"):
            rec["labels"] = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
    try:
        return ModelRecord.model_validate(rec)
    except ValueError as exc:
        raise FtcliError(
            f"{folder / 'ftcli.json'}: not a record ftcli can read ({str(exc).splitlines()[0]})",
            hint="the folder is damaged or was written by another tool; rerun the training",
        ) from None


# --------------------------------------------------------------------------- merge.json


@dataclass(frozen=True)
class MergeRecord:
    """What ``ftcli merge`` wrote and the figures that prove it (OUT_DIR/merge.json). The headline
    figures are those of ``saved_check``: the written folder, reloaded, against base + adapter."""

    out_dir: str
    base_model: str
    task: str
    method: str
    into: str
    dtype: str
    samples: int
    sample_source: str
    fold_check: dict | None  # float32 merged vs base + adapter; None for a full fine-tuning export
    saved_check: dict
    lora_modules_merged: int
    saved_modules: list
    parameters: int
    dequantized_vs_original: dict | None
    labels: list | None
    bytes_written: int
    seconds: float
    sha256: dict | None = None  # of the folder's *.safetensors, checked before loading it

    @property
    def max_logit_diff(self) -> float:
        return self.saved_check["max_logit_diff"]

    @property
    def relative_diff(self) -> float:
        return self.saved_check["relative_diff"]

    @property
    def tolerance(self) -> float:
        return self.saved_check["tolerance"]

    @property
    def prediction_agreement(self) -> float:
        return self.saved_check["prediction_agreement"]

    def as_dict(self) -> dict:
        """merge.json and run.json's ``merge``: the fields, with the headline figures beside them."""
        headline = ("max_logit_diff", "relative_diff", "tolerance", "prediction_agreement")
        return {
            **asdict(self),
            **{k: getattr(self, k) for k in headline},
            "passed": self.saved_check["passed"],
        }


def read_merge_record(folder: Path) -> MergeRecord:
    d = read_json(Path(folder) / "merge.json")
    fields = MergeRecord.__dataclass_fields__
    try:
        return MergeRecord(**{k: v for k, v in d.items() if k in fields})
    except TypeError as exc:
        raise FtcliError(f"{Path(folder) / 'merge.json'}: not a merge record ({exc})") from None


# --------------------------------------------------------------------------- run.json


class RunRecord(BaseModel):
    """run.json: the fields other commands read. It holds more (timings, versions, data counts),
    kept as written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str | None = None
    task: str | None = None
    method: str | None = None
    status: str = "unknown"
    params: dict = {}
    eval: dict = {}
    train: dict = {}

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: dict) -> dict:
        """Run folders written before the one metric vocabulary called completion_loss ``loss``."""
        metrics = (data.get("eval") or {}).get("metrics") or {}
        if "loss" in metrics and "completion_loss" not in metrics:
            metrics = {("completion_loss" if k == "loss" else k): v for k, v in metrics.items()}
            data = {**data, "eval": {**data["eval"], "metrics": metrics}}
        return data


def read_run_record(run_dir: Path) -> RunRecord | None:
    """The run's record, or None when the folder holds none. A run that says "running" but whose
    process is gone (kill -9, a crash) reads as "killed": it could not say so itself."""
    from ftcli.runlock import process_gone

    path = Path(run_dir) / "run.json"
    if not path.exists():
        return None
    data = read_json(path)
    running = isinstance(data, dict) and data.get("status") == "running"
    if running and process_gone(data.get("pid"), data.get("host")):
        data = {**data, "status": "killed"}
    return RunRecord.model_validate(data)


def write_run_json(run_dir: Path, data: dict) -> None:
    write_json(Path(run_dir) / "run.json", data)


# --------------------------------------------------------------------------- the folder


# What ``ftcli train`` writes inside a run folder: the only entries a fresh start removes.
RUN_ENTRIES = frozenset(
    {
        "recipe.yaml",
        "run.json",
        "metrics.jsonl",
        "libraries.log",
        "data",
        "init",
        "adapter",
        "model",
        "merged",
        "checkpoints",
        "eval",
        "eval-ensemble",
        "tb",
        "wandb",
    }
)
STUDY = "tune"  # a tune study (study.db, trials, best.yaml): never removed by train


def _owner(entry: str) -> str:
    """The run entry a temporary name belongs to (``.adapter.tmp-1234`` -> ``adapter``)."""
    if entry.startswith(".") and (".tmp" in entry or ".old-" in entry):
        return entry[1:].split(".tmp")[0].split(".old-")[0]
    return entry


def foreign_entries(run_dir: Path) -> list[str]:
    """What a run folder holds that ftcli did not write there (a study aside)."""
    if not Path(run_dir).is_dir():
        return []
    return sorted(
        e.name
        for e in Path(run_dir).iterdir()
        if _owner(e.name) not in RUN_ENTRIES and e.name != STUDY
    )


def clear_run(run_dir: Path) -> None:
    """Remove a run's own entries for a fresh start: never a study, never anything ftcli did not
    write (``_check_run_dir`` refused those before anything loaded)."""
    import shutil

    for e in Path(run_dir).iterdir():
        if e.name != STUDY and _owner(e.name) in RUN_ENTRIES:
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()


@dataclass(frozen=True)
class RunDir:
    """A finished (or started) run folder: its recipe and its sealed splits."""

    run_dir: Path
    recipe: Recipe
    prepared: PreparedData

    @property
    def examples(self) -> list[dict]:
        """The sealed test split."""
        return self.prepared.splits["test"]

    @property
    def name(self) -> str:
        return self.run_dir.name

    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def open_run(run_dir: Path) -> RunDir:
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise FtcliError(
            f"{run_dir} is not a run folder (no recipe.yaml)",
            hint="give a folder that `ftcli train` wrote, e.g. runs/quickstart",
        )
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.data.max_length == "auto":  # ftcli writes the number; a hand edit wrote auto back
        ml = recorded_max_length(run_dir)
        if ml is None:
            raise FtcliError(
                f"{run_dir}/recipe.yaml says data.max_length: auto and run.json records no number",
                hint="set data.max_length in that recipe.yaml to the length the run trained with",
            )
        recipe = recipe.model_copy(
            update={"data": recipe.data.model_copy(update={"max_length": ml})}
        )
    return RunDir(run_dir, recipe, load_prepared(run_dir / "data"))


def recorded_max_length(run_dir: Path) -> int | None:
    """The max_length a run recorded (run.json's data.max_length.value), None if absent."""
    try:
        return int(read_json(Path(run_dir) / "run.json")["data"]["max_length"]["value"])
    except (OSError, ValueError, KeyError, TypeError, FtcliError):
        return None


def latest_run(output_dir: str | Path = "runs") -> Path:
    runs = [p.parent for p in Path(output_dir).glob("*/run.json")]
    if not runs:
        raise FtcliError(
            f"no runs in {output_dir}/", hint="train one first: ftcli train quickstart"
        )
    return max(runs, key=lambda p: os.path.getmtime(p / "run.json"))


def run_of(folder: Path) -> Path | None:
    """The run folder around a trained folder, when there is one."""
    parent = Path(folder).parent
    if (parent / "run.json").exists() or (parent / "recipe.yaml").exists():
        return parent
    return None


@dataclass(frozen=True)
class Source:
    """A trained folder someone pointed at: a LoRA adapter, or a full fine-tuning model/ folder."""

    kind: str  # "adapter" | "full"
    path: Path  # the adapter folder or the model folder
    run_dir: Path | None  # the run folder around it, when there is one


def find_source(path: str | Path) -> Source:
    """An adapter folder, a full fine-tuning model/ folder, or a run folder holding either."""
    p = Path(path)
    if not p.exists():
        raise FtcliError(
            f"{p} does not exist",
            hint="give an adapter folder or a run folder, e.g. runs/quickstart",
        )
    if (p / "adapter_config.json").is_file():
        return Source("adapter", p, run_of(p))
    if (p / "adapter" / "adapter_config.json").is_file():
        return Source("adapter", p / "adapter", p)
    if (p / "model" / "config.json").is_file():
        return Source("full", p / "model", p)
    if (p / "config.json").is_file() and (p / "ftcli.json").is_file():
        return Source("full", p, run_of(p))
    raise FtcliError(
        f"no LoRA adapter or fine-tuned model in {p} (adapter_config.json / model/ not found)",
        hint="give an adapter folder or a run folder, e.g. runs/quickstart",
    )


def find_adapter(path: str | Path) -> Path:
    """The adapter folder of ``path`` (an adapter folder or a run folder holding adapter/)."""
    src = find_source(path)
    if src.kind != "adapter":
        raise FtcliError(
            f"{path} is a full fine-tuning run: it has no adapter",
            hint="use its model/ folder directly, or `ftcli merge` to export it",
        )
    return src.path


# --------------------------------------------------------------------------- the sealed split


def check_same_data(prepared: PreparedData, data_dir: Path) -> None:
    """A resumed run must see the very examples it started with."""
    saved = (
        read_json(data_dir / "data.json").get("sha256", {})
        if (data_dir / "data.json").exists()
        else {}
    )
    for name, rows in prepared.splits.items():
        if saved.get(name) and jsonl_digest(rows) != saved[name]:
            raise FtcliError(
                f"the {name} split differs from the one this run started with: the data changed",
                hint="restore the original data, or start a new run (--force or --set name=NEW)",
            )


def check_same_test(a: RunDir, b: RunDir) -> None:
    """Two runs can be compared only on the very same test examples, labels and task."""
    if a.recipe.task != b.recipe.task:
        raise FtcliError(
            f"{a.run_dir} is {a.recipe.task} and {b.run_dir} is {b.recipe.task}: nothing to compare"
        )
    if a.prepared.labels != b.prepared.labels:
        raise FtcliError(
            f"{a.run_dir} and {b.run_dir} have different labels ({a.prepared.labels} vs {b.prepared.labels})"
        )
    if a.examples != b.examples:
        raise FtcliError(
            f"{a.run_dir} and {b.run_dir} were not tested on the same examples",
            hint="compare runs prepared from the same data with the same data.split (seed and fractions)",
        )
