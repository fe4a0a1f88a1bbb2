"""A model ready for requests (``ftcli predict``, ``chat``, ``serve``): a plain folder, or one base
with named adapters switched per request (``PeftModel.load_adapter`` + ``set_adapter``).

A model is a plain folder (``ftcli merge`` output, any transformers folder), a run folder (its
merged/, model/ or base + adapter/, in that order), an adapter folder, or a model spec (hub id,
.gguf, pkg:...). Loading goes through ``ftcli.models``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ftcli.data.tokenize import collate, render_chat
from ftcli.data.windows import encode as encode_windows
from ftcli.data.windows import mean_by_owner
from ftcli.errors import FtcliError
from ftcli.forward import generate_answers
from ftcli.models import (
    load_adapters,
    load_folder,
    pads_left,
    resolve_device,
    tokenizer_from,
)
from ftcli.rundir import (
    ModelRecord,
    find_adapter,
    read_model_record,
    recorded_max_length,
    run_of,
)
from ftcli.sources import local_model_dir, resolve_model


@dataclass
class Predictor:
    """A model ready for requests: plain, or one base with named adapters switched per request."""

    model: object
    tokenizer: object
    task: str
    source: str
    labels: dict[str | None, list[str]]  # adapter name (None: plain model) -> label names
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder
    active: str | None = None
    max_length: int = 512
    device: str = "cpu"
    windows: bool = False  # data.long_documents: windows: one prediction from a text's windows

    def use(self, name: str | None) -> None:
        """Switch to adapter ``name`` (no reload: peft keeps every adapter's weights in memory)."""
        if name is None or name == self.active:
            return
        if name not in self.adapters:
            raise FtcliError(
                f"no adapter named {name!r}",
                hint=f"loaded adapters: {', '.join(self.adapters) or '(none)'}",
            )
        self.model.set_adapter(name)
        self.active = name

    @property
    def label_names(self) -> list[str]:
        return self.labels.get(self.active) or self.labels.get(None) or []

    def classify(self, texts: list[str], batch_size: int = 32, progress=None) -> list[dict]:
        """{"label", "score", "probs": {label: p}} per text, in order; batched by length. A
        windows classifier reads each text as its windows and averages their logits."""
        if self.windows:
            enc, owner = encode_windows(self.tokenizer, texts, self.max_length)
            enc = enc["input_ids"]
        else:
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
            owner = list(range(len(texts)))
        left = [0] * len(texts)  # windows of each text not yet read (for progress)
        for d in owner:
            left[d] += 1
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        rows_out: list = [None] * len(enc)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                rows = [{"input_ids": enc[i] or [pad], "labels": 0} for i in idx]
                b = collate(rows, pad, pads_left(self.model))
                logits = self.model(
                    input_ids=b["input_ids"].to(self.device),
                    attention_mask=b["attention_mask"].to(self.device),
                ).logits.float()
                done = 0
                for r, i in enumerate(idx):
                    rows_out[i] = logits[r].cpu()
                    left[owner[i]] -= 1
                    done += left[owner[i]] == 0
                if progress and done:
                    progress(done)
        if not texts:
            return []
        probs = torch.softmax(mean_by_owner(torch.stack(rows_out), owner, len(texts)), -1)
        names = self.label_names
        out = []
        for p in probs.tolist():
            k = max(range(len(p)), key=p.__getitem__)
            out.append(
                {
                    "label": names[k] if k < len(names) else str(k),
                    "score": p[k],
                    "probs": {(names[j] if j < len(names) else str(j)): v for j, v in enumerate(p)},
                }
            )
        return out

    def prompt_text(self, messages: list[dict], raw: bool = False) -> str:
        """The text a causal LM continues: the chat template (or ftcli's plain layout) unless ``raw``."""
        if raw:
            return "\n".join(m["content"] for m in messages)
        return render_chat(self.tokenizer, messages, add_generation_prompt=True)

    def generate(
        self,
        conversations: list[list[dict]],
        max_new_tokens: int = 64,
        batch_size: int = 8,
        temperature: float = 0.0,
        raw: bool = False,
        progress=None,
    ) -> list[str]:
        """The next assistant turn of each conversation, batched, greedy unless a temperature is given."""
        prompts = [self.prompt_text(c, raw) for c in conversations]
        cfg = self.model.config
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        room = max(
            1, min(self.max_length, positions - max_new_tokens) if positions else self.max_length
        )
        # the chat template already holds any special tokens the model expects
        special = raw or not getattr(self.tokenizer, "chat_template", None)
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            answers = generate_answers(
                self.model,
                self.tokenizer,
                chunk,
                special,
                max_new_tokens,
                batch_size,
                self.device,
                room,
                temperature,
            )
            out += [a["answer"] for a in answers]
            if progress:
                progress(len(chunk))
        return out

    def stream(
        self,
        messages: list[dict],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        stop: threading.Event | None = None,
    ):
        """The next assistant turn of one conversation as text pieces, as they are generated
        (transformers' TextIteratorStreamer, generation in a thread), then a ``StreamEnd``.
        Setting ``stop`` (or closing the generator, as Ctrl-C does) ends generation at the next token."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tok = self.tokenizer
        cfg = self.model.config
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        room = max(
            1, min(self.max_length, positions - max_new_tokens) if positions else self.max_length
        )
        eos = tok.eos_token_id
        prompt = self.prompt_text(messages)
        ids = tok(prompt, add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"]
        ids = ids[-room:] or [tok.bos_token_id if tok.bos_token_id is not None else eos]
        stop = stop or threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), device=input_ids.device)

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict = {"max_new_tokens": max_new_tokens, "eos_token_id": eos}
        kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else eos
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        done: dict = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    done["ids"] = self.model.generate(
                        input_ids=torch.tensor([ids], device=self.device),
                        attention_mask=torch.ones(
                            (1, len(ids)), dtype=torch.long, device=self.device
                        ),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop()]),
                        **kwargs,
                    )
            except BaseException as exc:  # handed to the caller's thread below
                done["error"] = exc
                streamer.end()

        self.model.eval()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        finished = False
        try:
            for piece in streamer:
                if piece:
                    yield piece
            finished = True
        finally:
            if not finished:  # the caller left early (Ctrl-C, or it closed the generator)
                stop.set()
            worker.join()
        if "error" in done:
            raise done["error"]
        new = done["ids"][0, len(ids) :].tolist()
        ended = eos in new
        n = new.index(eos) if ended else len(new)
        yield StreamEnd(tokens=n, cut=not ended and n >= max_new_tokens, stopped=stop.is_set())


@dataclass(frozen=True)
class StreamEnd:
    """The last item ``Predictor.stream`` yields: how the answer ended."""

    tokens: int  # tokens generated
    cut: bool  # stopped by max_new_tokens, not by the model's end-of-sequence token
    stopped: bool  # stopped early by the caller (``stop`` was set, e.g. Ctrl-C)


def _recipe_data(run_dir: Path | None) -> dict:
    if run_dir is not None and (run_dir / "recipe.yaml").exists():
        doc = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
        return doc.get("data") or {}
    return {}


def _max_length(run_dir: Path | None, tok) -> int:
    """The run's resolved data.max_length (recipe.yaml holds the number auto chose)."""
    ml = _recipe_data(run_dir).get("max_length")
    if isinstance(ml, int):
        return ml
    if run_dir is not None:  # a recipe.yaml edited back to auto: the number the run recorded
        ml = recorded_max_length(run_dir)
        if ml:
            return ml
    m = getattr(tok, "model_max_length", 512) or 512
    return int(min(m, 512))


def _windows(run_dir: Path | None) -> bool:
    """Whether the run read long documents as windows (data.long_documents: windows)."""
    return _recipe_data(run_dir).get("long_documents") == "windows"


def _plain(folder: Path, run_dir: Path | None) -> Predictor:
    task = read_model_record(folder).task
    tok = tokenizer_from(folder)
    model = load_folder(folder, task)
    labels = None
    if task == "classification":
        id2label = model.config.id2label or {}
        labels = [id2label[i] for i in range(len(id2label))]
    device = resolve_device("auto")
    return Predictor(
        model.to(device),
        tok,
        task,
        str(folder),
        {None: labels or []},
        max_length=_max_length(run_dir, tok),
        device=device,
        windows=task == "classification" and _windows(run_dir),
    )


def adapter_name(path: Path) -> str:
    """A short name for an adapter: its run's name, else its folder's name, with what peft
    refuses in a name (a dot: it names a module) made an underscore (``v1.2`` -> ``v1_2``)."""
    name = path.parent.name if path.name == "adapter" else path.name
    return re.sub(r"[^\w-]", "_", name) or "adapter"


def _parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            name, path = "", spec
        folder = find_adapter(path)
        name = name or adapter_name(folder)
        if not re.fullmatch(r"[\w-]+", name):
            raise FtcliError(
                f"adapter name {name!r} holds characters an adapter name cannot have",
                hint="use letters, digits, '-' and '_': --adapter NAME=PATH",
            )
        if any(n == name for n, _ in out):
            raise FtcliError(
                f"two adapters are named {name!r}", hint="name them: --adapter NAME=PATH"
            )
        out.append((name, folder))
    return out


def _flavour(rec: ModelRecord) -> tuple:
    """What the base must look like for an adapter: original weights, or dequantized with these settings."""
    if rec.kind == "qlora":
        q = rec.quant
        return ("dequantized", q.bits, q.quant_type, q.double_quant)
    return ("original",)


def _check_compatible(recs: list[tuple[str, Path, ModelRecord]], base: str | None) -> None:
    """Adapters share one base only if they agree on task, base, its weights and the head's size."""
    n0, _, first = recs[0]
    for n, _, r in recs[1:]:
        if r.task != first.task:
            raise FtcliError(
                f"adapter {n!r} is for {r.task}, {n0!r} for {first.task}: they cannot share a model"
            )
        if base is None and r.base_model != first.base_model:
            raise FtcliError(
                f"adapter {n!r} was trained on {r.base_model}, {n0!r} on {first.base_model}",
                hint="serve adapters of one base model together (or name the base with MODEL)",
            )
        if _flavour(r) != _flavour(first):
            raise FtcliError(
                f"adapter {n!r} needs the base as {_flavour(r)[0]} weights, {n0!r} as {_flavour(first)[0]}",
                hint="serve QLoRA and LoRA adapters from separate commands",
            )
        if first.task == "classification" and len(r.labels or []) != len(first.labels or []):
            raise FtcliError(
                f"adapter {n!r} has {len(r.labels or [])} labels, {n0!r} has "
                f"{len(first.labels or [])}: their heads cannot share a base"
            )


def _with_adapters(base: str | None, specs: list[str], run_dir: Path | None = None) -> Predictor:
    """One base model, loaded once, with every adapter attached under its name."""
    named = _parse_adapters(specs)
    recs = [(n, p, read_model_record(p)) for n, p in named]
    _check_compatible(recs, base)
    model, tok = load_adapters(recs, base)
    first = recs[0][2]
    device = resolve_device("auto")
    labels = {n: list(r.labels or []) for n, _, r in recs}
    run_dir = run_dir or (named[0][1].parent if named[0][1].name == "adapter" else None)
    return Predictor(
        model.to(device),
        tok,
        first.task,
        base or str(first.base_model),
        labels,
        {n: str(p) for n, p in named},
        recs[0][0],
        _max_length(run_dir, tok),
        device,
        first.task == "classification" and _windows(run_dir),
    )


def load_predictor(model_or_run: str | None, adapters: list[str] | None = None) -> Predictor:
    """Load what the user named: a model folder, a run, an adapter, a model spec, or a base + adapters."""
    if adapters:
        return _with_adapters(model_or_run, adapters)
    if not model_or_run:
        raise FtcliError(
            "name a model or a run folder (or give --adapter)",
            hint="e.g. ftcli predict runs/quickstart --text 'great film'",
        )
    p = Path(model_or_run)
    if p.is_dir():
        for sub in ("merged", "model"):
            if (p / sub / "config.json").is_file():
                return _plain(p / sub, p)
        if (p / "adapter" / "adapter_config.json").is_file() or (
            p / "adapter_config.json"
        ).is_file():
            return _with_adapters(None, [str(p)], p if (p / "adapter").is_dir() else None)
        if (p / "config.json").is_file():
            return _plain(p, run_of(p))
        if (p / "run.json").exists():
            raise FtcliError(
                f"{p} holds no trained model (merged/, model/ or adapter/)",
                hint="finish the run first: ftcli train <recipe> --resume",
            )
    return _plain(Path(local_model_dir(resolve_model(model_or_run))), None)
