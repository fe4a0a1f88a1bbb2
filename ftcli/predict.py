"""Use a fine-tuned model: ``predict`` (labels with probabilities, or generations), ``chat``, several
adapters on one base, and user feedback that becomes the next round of training data.

A model is a plain folder (``ftcli merge`` output, any transformers folder), a run folder (its
merged/, model/ or base + adapter/, in that order), an adapter folder, or a model spec (hub id,
.gguf, pkg:...). With several adapters (``--adapter a --adapter b``) the base is loaded once and
peft switches between them per request (``PeftModel.load_adapter`` + ``set_adapter``).

Feedback goes to two JSON-lines files. FEEDBACK (default feedback.jsonl) holds only rows fit to
train on, in the layout the data loader reads with no new recipe keys: classification
``{"text", "label"}`` (the confirmed or corrected label), chat ``{"messages": [...]}`` ending in the
confirmed or corrected answer; a recipe takes it as ``data.path`` (with ``label_column: label``, or
``messages_column: messages``). Answers marked bad without a correction go to
``<stem>-rejected.jsonl`` beside it, so they can never be trained on by accident but are kept (for
preference tuning, or to fix later). Each row also records the model, adapter, verdict and time.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ftcli.adapt import resolve_device
from ftcli.errors import FtcliError
from ftcli.util import append_jsonl, read_json

COMMANDS_HELP = ("/good  mark the last answer good    /bad  mark it bad    /fix TEXT  give the right answer\n"
                 "/switch NAME  use another adapter    /adapters  list them    /reset  new conversation\n"
                 "/help  this list    /quit  leave (or Ctrl-D)")


# --------------------------------------------------------------------------- loading


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

    def use(self, name: str | None) -> None:
        """Switch to adapter ``name`` (no reload: peft keeps every adapter's weights in memory)."""
        if name is None or name == self.active:
            return
        if name not in self.adapters:
            raise FtcliError(f"no adapter named {name!r}", hint=f"loaded adapters: {', '.join(self.adapters) or '(none)'}")
        self.model.set_adapter(name)
        self.active = name

    @property
    def label_names(self) -> list[str]:
        return self.labels.get(self.active) or self.labels.get(None) or []

    def classify(self, texts: list[str], batch_size: int = 32, progress=None) -> list[dict]:
        """{"label", "score", "probs": {label: p}} per text, in order; batched by length."""
        import torch

        from ftcli.train import collate

        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
        out: list = [None] * len(texts)
        names = self.label_names
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                b = collate([{"input_ids": enc[i] or [self.tokenizer.pad_token_id], "labels": 0} for i in idx],
                            self.tokenizer.pad_token_id)
                logits = self.model(input_ids=b["input_ids"].to(self.device),
                                    attention_mask=b["attention_mask"].to(self.device)).logits.float()
                for i, p in zip(idx, torch.softmax(logits, -1).cpu().tolist(), strict=True):
                    k = max(range(len(p)), key=p.__getitem__)
                    lab = names[k] if k < len(names) else str(k)
                    out[i] = {"label": lab, "score": p[k],
                              "probs": {(names[j] if j < len(names) else str(j)): v for j, v in enumerate(p)}}
                if progress:
                    progress(len(idx))
        return out

    def prompt_text(self, messages: list[dict], raw: bool = False) -> str:
        """The text a causal LM continues: the chat template (or ftcli's plain layout) unless ``raw``."""
        from ftcli.data import render_chat

        if raw:
            return "\n".join(m["content"] for m in messages)
        return render_chat(self.tokenizer, messages, add_generation_prompt=True)

    def generate(self, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
                 temperature: float = 0.0, raw: bool = False, progress=None) -> list[str]:
        """The next assistant turn of each conversation, batched (left padding), greedy unless a
        temperature is given."""
        import torch

        tok = self.tokenizer
        prompts = [self.prompt_text(c, raw) for c in conversations]
        cfg = self.model.config
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        room = max(1, min(self.max_length, positions - max_new_tokens) if positions else self.max_length)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list = [None] * len(prompts)
        side, cut = tok.padding_side, tok.truncation_side
        tok.padding_side = tok.truncation_side = "left"  # a long prompt keeps its end, where the answer starts
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                # the chat template already holds any special tokens the model expects
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=room, add_special_tokens=raw or not getattr(tok, "chat_template", None))
                kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                          "do_sample": temperature > 0}
                if temperature > 0:
                    kwargs["temperature"] = temperature
                else:  # greedy: drop sampling settings a generation_config may carry
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                with torch.no_grad():
                    gen = self.model.generate(input_ids=enc["input_ids"].to(self.device),
                                              attention_mask=enc["attention_mask"].to(self.device), **kwargs)
                new = gen[:, enc["input_ids"].shape[1]:]
                for i, ids in zip(idx, new, strict=True):
                    out[i] = tok.decode(ids, skip_special_tokens=True).strip()
                if progress:
                    progress(len(idx))
        finally:
            tok.padding_side, tok.truncation_side = side, cut
        return out


def _task_of_folder(folder: Path) -> str:
    for name in ("merge.json", "ftcli.json"):
        if (folder / name).exists():
            task = read_json(folder / name).get("task")
            if task:
                return task
    cfg = read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    archs = cfg.get("architectures") or []
    return "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def _tokenizer(folder: str | Path):
    from ftcli.adapt import tokenizer_from

    return tokenizer_from(folder)


def _max_length(run_dir: Path | None, tok) -> int:
    if run_dir is not None and (run_dir / "recipe.yaml").exists():
        import yaml

        doc = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
        ml = (doc.get("data") or {}).get("max_length")
        if isinstance(ml, int):
            return ml
    m = getattr(tok, "model_max_length", 512) or 512
    return int(min(m, 512))


def _plain(folder: Path, run_dir: Path | None) -> Predictor:
    import torch

    from ftcli.merge import model_class

    task = _task_of_folder(folder)
    tok = _tokenizer(folder)
    try:
        model = model_class(task).from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise FtcliError(f"cannot load the model in {folder}: {str(exc).splitlines()[0]}") from None
    labels = None
    if task == "classification":
        id2label = model.config.id2label or {}
        labels = [id2label[i] for i in range(len(id2label))]
    device = resolve_device("auto")
    return Predictor(model.to(device).eval(), tok, task, str(folder), {None: labels or []},
                     max_length=_max_length(run_dir, tok), device=device)


def adapter_name(path: Path) -> str:
    """A short name for an adapter: its run's name, else its folder's name."""
    return path.parent.name if path.name == "adapter" else path.name


def _parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    from ftcli.merge import find_adapter

    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            name, path = "", spec
        folder = find_adapter(path)
        name = name or adapter_name(folder)
        if any(n == name for n, _ in out):
            raise FtcliError(f"two adapters are named {name!r}", hint="name them: --adapter NAME=PATH")
        out.append((name, folder))
    return out


def _flavour(rec: dict) -> tuple:
    """What the base must look like for an adapter: original weights, or dequantized with these settings."""
    m = rec.get("method") or {}
    if m.get("kind") == "qlora":
        q = m.get("quantization") or {}
        return ("dequantized", q.get("bits", 4), q.get("quant_type", "nf4"), q.get("double_quant", True))
    return ("original",)


def _with_adapters(base: str | None, specs: list[str], run_dir: Path | None = None) -> Predictor:
    """One base model, loaded once, with every adapter attached under its name."""
    from peft import PeftModel

    from ftcli.merge import adapter_record, base_dir, load_base

    named = _parse_adapters(specs)
    recs = [(n, p, adapter_record(p)) for n, p in named]
    first = recs[0][2]
    for n, _, r in recs[1:]:
        if r["task"] != first["task"]:
            raise FtcliError(f"adapter {n!r} is for {r['task']}, {recs[0][0]!r} for {first['task']}: they cannot share a model")
        if base is None and r.get("base_model") != first.get("base_model"):
            raise FtcliError(f"adapter {n!r} was trained on {r.get('base_model')}, {recs[0][0]!r} on {first.get('base_model')}",
                             hint="serve adapters of one base model together (or name the base with MODEL)")
        if _flavour(r) != _flavour(first):
            raise FtcliError(f"adapter {n!r} needs the base as {_flavour(r)[0]} weights, {recs[0][0]!r} as {_flavour(first)[0]}",
                             hint="serve QLoRA and LoRA adapters from separate commands")
        if first["task"] == "classification" and len(r.get("labels") or []) != len(first.get("labels") or []):
            raise FtcliError(f"adapter {n!r} has {len(r.get('labels') or [])} labels, {recs[0][0]!r} has "
                             f"{len(first.get('labels') or [])}: their heads cannot share a base")
    tok = _tokenizer(named[0][1])
    model_dir = base_dir(first, base)
    try:
        model = load_base(first, model_dir, "dequantized", tok)
        name0, path0, _ = recs[0]
        model = PeftModel.from_pretrained(model, path0, adapter_name=name0)
        for n, p, _ in recs[1:]:
            model.load_adapter(p, adapter_name=n)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise FtcliError(f"cannot load the adapters onto {base or first.get('base_model')}: {str(exc).splitlines()[0]}",
                         hint="name the base the adapters were trained on") from None
    model.set_adapter(recs[0][0])
    device = resolve_device("auto")
    labels = {n: list(r.get("labels") or []) for n, _, r in recs}
    run_dir = run_dir or (named[0][1].parent if named[0][1].name == "adapter" else None)
    return Predictor(model.to(device).eval(), tok, first["task"], base or str(first.get("base_model")), labels,
                     {n: str(p) for n, p in named}, recs[0][0], _max_length(run_dir, tok), device)


def load_predictor(model_or_run: str | None, adapters: list[str] | None = None) -> Predictor:
    """Load what the user named: a model folder, a run, an adapter, a model spec, or a base + adapters."""
    if adapters:
        return _with_adapters(model_or_run, adapters)
    if not model_or_run:
        raise FtcliError("name a model or a run folder (or give --adapter)", hint="e.g. ftcli predict runs/quickstart --text 'great film'")
    p = Path(model_or_run)
    if p.is_dir():
        for sub in ("merged", "model"):
            if (p / sub / "config.json").is_file():
                return _plain(p / sub, p)
        if (p / "adapter" / "adapter_config.json").is_file() or (p / "adapter_config.json").is_file():
            return _with_adapters(None, [str(p)], p if (p / "adapter").is_dir() else None)
        if (p / "config.json").is_file():
            return _plain(p, p.parent if (p.parent / "recipe.yaml").exists() else None)
        if (p / "run.json").exists():
            raise FtcliError(f"{p} holds no trained model (merged/, model/ or adapter/)",
                             hint="finish the run first: ftcli train <recipe> --resume")
    from ftcli.sources import local_model_dir, resolve_model

    return _plain(Path(local_model_dir(resolve_model(model_or_run))), None)


# --------------------------------------------------------------------------- feedback


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class FeedbackLog:
    """Appends verdicts on answers: trainable rows to ``path``, bad answers without a fix beside it."""

    def __init__(self, path: str | Path, model: str):
        self.path = Path(path)
        self.rejected_path = self.path.with_name(f"{self.path.stem}-rejected{self.path.suffix or '.jsonl'}")
        self.model = model
        self.counts = {"good": 0, "fixed": 0, "bad": 0}

    def _write(self, row: dict, verdict: str, adapter: str | None) -> None:
        row.update(feedback=verdict, model=self.model, time=now())
        if adapter:
            row["adapter"] = adapter
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.rejected_path if verdict == "bad" else self.path, row)
        self.counts[verdict] += 1

    def classification(self, text: str, predicted: str, verdict: str, labels: list[str],
                       correct: str | None = None, adapter: str | None = None) -> None:
        if verdict == "fixed":
            if correct not in labels:
                raise FtcliError(f"{correct!r} is not one of the model's labels: {', '.join(labels)}")
            self._write({"text": text, "label": correct, "predicted": predicted}, verdict, adapter)
        elif verdict == "good":
            self._write({"text": text, "label": predicted, "predicted": predicted}, verdict, adapter)
        else:
            self._write({"text": text, "predicted": predicted}, verdict, adapter)

    def chat(self, context: list[dict], answer: str, verdict: str, correct: str | None = None,
             adapter: str | None = None) -> None:
        if verdict == "bad":
            self._write({"messages": context, "rejected": answer}, verdict, adapter)
            return
        final = correct if verdict == "fixed" else answer
        row: dict = {"messages": [*context, {"role": "assistant", "content": final}]}
        if verdict == "fixed":
            row["rejected"] = answer
        self._write(row, verdict, adapter)


def parse_verdict(line: str) -> tuple[str, str | None] | None:
    """'/good' -> ('good', None); '/bad' -> ('bad', None); '/fix TEXT' -> ('fixed', TEXT); else None."""
    s = line.strip()
    head, _, rest = s.partition(" ")
    if head in ("/good", "/g", "/+"):
        return "good", None
    if head in ("/bad", "/b", "/-"):
        return "bad", None
    if head in ("/fix", "/f"):
        if not rest.strip():
            raise FtcliError("/fix needs the right answer after it, e.g. /fix positive")
        return "fixed", rest.strip()
    return None


# --------------------------------------------------------------------------- chat


@dataclass
class Turn:
    user: str
    answer: str
    verdict: str | None = None  # good | fixed | bad
    fixed: str | None = None
    adapter: str | None = None


class ChatSession:
    """A conversation: its turns, the verdicts on them, and what goes into a feedback row."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[Turn] = []

    def messages(self, upto: int | None = None) -> list[dict]:
        """The conversation as the model sees it; a fixed answer replaces the model's own."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns[:upto]:
            msgs += [{"role": "user", "content": t.user},
                     {"role": "assistant", "content": t.fixed if t.verdict == "fixed" else t.answer}]
        return msgs

    def context_for_feedback(self, k: int) -> list[dict]:
        """What precedes answer ``k`` in its feedback row. Every assistant turn in a chat row is
        trained on, so earlier turns come along only if each was marked good or fixed; otherwise
        the row keeps just the system prompt and the question."""
        if all(t.verdict in ("good", "fixed") for t in self.turns[:k]):
            ctx = self.messages(upto=k)
        else:
            ctx = [{"role": "system", "content": self.system}] if self.system else []
        return [*ctx, {"role": "user", "content": self.turns[k].user}]


def chat_loop(pred: Predictor, stdin: TextIO, stdout: TextIO, feedback: FeedbackLog | None = None,
              system: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0) -> dict:
    """Read lines from ``stdin``, answer on ``stdout``; slash commands mark answers and switch adapters.
    Returns the transcript and the feedback counts."""
    if pred.task != "causal_lm":
        raise FtcliError("chat is for causal language models; this one is a classifier",
                         hint="use ftcli predict MODEL --text '...'")
    session = ChatSession(system)

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    where = f" (adapter {pred.active}; /switch NAME to change)" if pred.adapters else ""
    say(f"chatting with {pred.source}{where}. /help for commands, /quit to leave.")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            say("")
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        cmd = text.strip().split(" ", 1)[0]
        try:
            if cmd in ("/quit", "/exit", "/q"):
                break
            if cmd == "/help":
                say(COMMANDS_HELP)
                continue
            if cmd == "/reset":
                session = ChatSession(system)
                say("(new conversation)")
                continue
            if cmd == "/adapters":
                say(", ".join(f"{n}{' (active)' if n == pred.active else ''}" for n in pred.adapters) or "(no adapters: a single model)")
                continue
            if cmd == "/switch":
                name = text.strip()[len("/switch"):].strip()
                if not pred.adapters:
                    raise FtcliError("no adapters to switch between", hint="start chat with --adapter A --adapter B")
                pred.use(name)
                say(f"(now answering with adapter {name})")
                continue
            verdict = parse_verdict(text)
            if verdict is not None:
                if not session.turns:
                    raise FtcliError("no answer to mark yet")
                if feedback is None:
                    raise FtcliError("feedback is off", hint="start chat with --feedback FILE")
                k = len(session.turns) - 1
                turn = session.turns[k]
                if turn.verdict is not None:
                    raise FtcliError(f"the last answer is already marked {turn.verdict}")
                kind, fix = verdict
                feedback.chat(session.context_for_feedback(k), turn.answer, kind, fix, turn.adapter)
                turn.verdict, turn.fixed = kind, fix
                say(f"(marked {kind}; saved to {feedback.rejected_path if kind == 'bad' else feedback.path})")
                continue
            if cmd.startswith("/") and cmd[1:].isalpha():
                raise FtcliError(f"unknown command {cmd}", hint="/help lists them")
        except FtcliError as exc:
            say(f"! {exc.render()}")
            continue
        session.turns.append(Turn(text, "", adapter=pred.active))
        answer = pred.generate([session.messages()[:-1]], max_new_tokens=max_new_tokens, temperature=temperature)[0]
        session.turns[-1].answer = answer
        say(f"{pred.active or 'model'}> {answer}")
    return {"turns": [t.__dict__ for t in session.turns],
            "feedback": dict(feedback.counts) if feedback else None,
            "feedback_file": str(feedback.path) if feedback else None}


# --------------------------------------------------------------------------- predict


def read_requests(texts: list[str] | None, input_path: str | None, text_column: str = "text") -> list[dict]:
    """Requests from --text and/or a file: {"text"} or {"messages"}, with an optional "adapter"."""
    from ftcli.data import read_file

    rows: list[dict] = [{"text": t} for t in texts or []]
    if input_path:
        if not Path(input_path).is_file():
            raise FtcliError(f"{input_path} does not exist")
        for i, r in enumerate(read_file(input_path)):
            req: dict = {}
            if isinstance(r.get("messages"), list):
                req["messages"] = r["messages"]
            elif text_column in r:
                req["text"] = "" if r[text_column] is None else str(r[text_column])
            else:
                raise FtcliError(f"{input_path}: row {i + 1} has no {text_column!r} column (columns: {', '.join(r)})",
                                 hint="name the text column with --text-column")
            if r.get("adapter"):
                req["adapter"] = str(r["adapter"])
            rows.append(req)
    if not rows:
        raise FtcliError("nothing to predict", hint="give --text '...' or --input FILE")
    return rows


def predict(pred: Predictor, requests: list[dict], batch_size: int = 32, max_new_tokens: int = 64,
            temperature: float = 0.0, raw: bool = False, progress=None) -> list[dict]:
    """Answer every request. With several adapters, a request naming one goes to it; the others go
    to every adapter (one output row each), so adapters can be compared on the same inputs."""
    jobs: dict[str | None, list[int]] = {}
    expanded: list[dict] = []
    for r in requests:
        targets = [r["adapter"]] if r.get("adapter") else (list(pred.adapters) or [None])
        for a in targets:
            if a is not None and a not in pred.adapters:
                raise FtcliError(f"a request names adapter {a!r}, which is not loaded",
                                 hint=f"loaded: {', '.join(pred.adapters) or '(none)'}")
            row = {k: v for k, v in r.items() if k != "adapter"}
            if a is not None:
                row["adapter"] = a
            jobs.setdefault(a, []).append(len(expanded))
            expanded.append(row)
    for adapter, idx in jobs.items():  # one switch per adapter, not per request
        pred.use(adapter)
        if pred.task == "classification":
            if any("messages" in expanded[i] for i in idx):
                raise FtcliError("a classifier takes text, not messages")
            for i, res in zip(idx, pred.classify([expanded[i]["text"] for i in idx], batch_size, progress), strict=True):
                expanded[i].update(res)
        else:
            convs = [expanded[i].get("messages") or [{"role": "user", "content": expanded[i]["text"]}] for i in idx]
            gens = pred.generate(convs, max_new_tokens, min(batch_size, 8), temperature, raw, progress)
            for i, g in zip(idx, gens, strict=True):
                expanded[i]["generation"] = g
    return expanded


def write_predictions(rows: list[dict], path: Path) -> None:
    """JSON lines, or CSV (probabilities as prob_<label> columns) when the name ends in .csv."""
    from ftcli.util import atomic_write_text, write_jsonl

    if path.suffix.lower() == ".csv":
        import pandas as pd

        flat = []
        for r in rows:
            f = {k: (json.dumps(v, ensure_ascii=False) if k == "messages" else v) for k, v in r.items() if k != "probs"}
            f.update({f"prob_{k}": v for k, v in (r.get("probs") or {}).items()})
            flat.append(f)
        atomic_write_text(path, pd.DataFrame(flat).to_csv(index=False))
    else:
        write_jsonl(path, rows)


def review_loop(pred: Predictor, rows: list[dict], stdin: TextIO, stdout: TextIO, feedback: FeedbackLog) -> dict:
    """Show each prediction and read a verdict: /good, /bad, /fix ANSWER, or an empty line to skip."""
    labels = pred.label_names
    for r in rows:
        shown = r.get("text") or json.dumps(r.get("messages"), ensure_ascii=False)
        answer = r.get("label") if pred.task == "classification" else r.get("generation")
        stdout.write(f"\n{shown}\n  -> {answer}" + (f" ({r['score']:.1%})" if "score" in r else "")
                     + (f" [adapter {r['adapter']}]" if r.get("adapter") else "") + "\n")
        while True:
            stdout.write("feedback (/good, /bad, /fix ANSWER, enter to skip)> ")
            stdout.flush()
            line = stdin.readline()
            if not line:
                return dict(feedback.counts)
            if not line.strip():
                break
            try:
                verdict = parse_verdict(line)
                if verdict is None:
                    raise FtcliError(f"not a verdict: {line.strip()!r}", hint="/good, /bad or /fix ANSWER")
                kind, fix = verdict
                if pred.task == "classification":
                    pred.use(r.get("adapter"))
                    feedback.classification(r["text"], answer, kind, pred.label_names or labels, fix, r.get("adapter"))
                else:
                    ctx = r.get("messages") or [{"role": "user", "content": r["text"]}]
                    feedback.chat(ctx, answer, kind, fix, r.get("adapter"))
                stdout.write(f"  (marked {kind})\n")
                break
            except FtcliError as exc:
                stdout.write(f"  ! {exc.render()}\n")
    return dict(feedback.counts)


def progress_bar(console, total: int, what: str):
    """A rich progress bar over requests (off when the console is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(what, total=total)
    return bar, lambda n: bar.advance(task, n)

