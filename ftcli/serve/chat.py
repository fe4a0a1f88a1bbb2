"""The terminal loops: ``chat`` (a conversation with slash commands for feedback and adapters)
and ``predict --review`` (a verdict on each prediction)."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ftcli.errors import FtcliError
from ftcli.serve.feedback import FeedbackLog, parse_verdict
from ftcli.serve.predictor import Predictor, StreamEnd

COMMANDS_HELP = (
    "/good  mark the last answer good    /bad  mark it bad    /fix TEXT  give the right answer\n"
    "/reset  new conversation    /help  this list    /quit  leave (or Ctrl-D; Ctrl-C stops an answer)"
)
SWITCH_HELP = "/switch NAME  use another adapter    /adapters  list them\n"
THINKING = "\x1b[2mthinking…\x1b[0m"
ERASE_LINE = "\r\x1b[K"


@dataclass
class Turn:
    user: str
    answer: str
    verdict: str | None = None  # good | fixed | bad
    fixed: str | None = None
    adapter: str | None = None
    cut: bool = False  # stopped at --max-new-tokens
    stopped: bool = False  # stopped by Ctrl-C


class ChatSession:
    """A conversation: its turns, the verdicts on them, and what goes into a feedback row."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[Turn] = []

    def messages(self, upto: int | None = None) -> list[dict]:
        """The conversation as the model sees it; a fixed answer replaces the model's own."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns[:upto]:
            msgs += [
                {"role": "user", "content": t.user},
                {"role": "assistant", "content": t.fixed if t.verdict == "fixed" else t.answer},
            ]
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


def chat_run(model: str | None, adapters: list[str] | None) -> Path | None:
    """The run folder behind what ``chat`` was given (a run, its adapter/ or merged/ folder, or the
    first --adapter), or None for a plain model: its recipe and folder give chat's defaults."""
    from ftcli.rundir import run_of

    specs = [
        a.partition("=")[2] if "=" in a and not Path(a).exists() else a for a in adapters or []
    ]
    for spec in specs if adapters else [model]:
        if not spec:
            continue
        p = Path(spec)
        if (p / "recipe.yaml").is_file():
            return p
        if p.is_dir() and run_of(p) is not None:
            return run_of(p)
    return None


def run_system_prompt(run_dir: Path | None) -> str | None:
    """The ``data.system_prompt`` the run trained with: the model learned to answer under it."""
    if run_dir is None:
        return None
    from ftcli.recipe import load_recipe

    return load_recipe(run_dir / "recipe.yaml").data.system_prompt


def _line_reader(stdin: TextIO, stdout: TextIO, interactive: bool):
    """A function reading one line ("" at EOF). In a terminal it is ``input()`` with readline:
    line editing, and history kept between sessions in ftcli's cache."""
    if not interactive:

        def read() -> str:
            stdout.write("you> ")
            stdout.flush()
            return stdin.readline()

        return read, lambda: None
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        readline = None
    history = None
    if readline is not None:
        from ftcli.sources import cache_dir

        history = cache_dir() / "chat_history"
        with contextlib.suppress(OSError):
            readline.read_history_file(history)

    def read() -> str:
        try:
            return input("you> ") + "\n"
        except EOFError:
            return ""

    def save() -> None:
        if readline is not None and history is not None:
            with contextlib.suppress(OSError):
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(1000)
                readline.write_history_file(history)

    return read, save


def chat_loop(
    pred: Predictor,
    stdin: TextIO,
    stdout: TextIO,
    feedback: FeedbackLog | None = None,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    interactive: bool | None = None,
) -> dict:
    """Read lines from ``stdin``, stream each answer to ``stdout`` as it is generated; slash commands
    mark answers and switch adapters. Ctrl-C stops an answer; a second Ctrl-C (or /quit) leaves.
    ``interactive`` (default: both ends are a terminal) adds readline editing and the thinking mark.
    Returns the transcript and the feedback counts."""
    if pred.task != "causal_lm":
        raise FtcliError(
            "chat is for causal language models; this one is a classifier",
            hint="use ftcli predict MODEL --text '...'",
        )
    if interactive is None:
        interactive = (
            stdin is sys.stdin and _isatty(stdin) and _isatty(stdout) and stdout is sys.stdout
        )
    session = ChatSession(system)
    several = len(pred.adapters) > 1

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    where = f" (adapter {pred.active}; /switch NAME to change)" if several else ""
    say(f"chatting with {pred.source}{where}. /help for commands, /quit to leave.")
    if system:
        say(f"system prompt: {system}")
    read, save_history = _line_reader(stdin, stdout, interactive)
    armed = False  # a Ctrl-C just happened: the next one leaves
    try:
        while True:
            try:
                line = read()
            except KeyboardInterrupt:
                if armed:
                    say("")
                    break
                armed = True
                say("\n(Ctrl-C again or /quit to leave)")
                continue
            if not line:  # EOF
                say("")
                break
            armed = False
            text = line.rstrip("\n")
            if not text.strip():
                continue
            cmd = text.strip().split(" ", 1)[0]
            try:
                if cmd in ("/quit", "/exit", "/q"):
                    break
                if cmd == "/help":
                    say((SWITCH_HELP if several else "") + COMMANDS_HELP)
                    continue
                if cmd == "/reset":
                    session = ChatSession(system)
                    say("(new conversation)")
                    continue
                if cmd in ("/adapters", "/switch") and not several:
                    raise FtcliError(
                        "one model loaded: nothing to switch to",
                        hint="start chat with --adapter A --adapter B to compare adapters",
                    )
                if cmd == "/adapters":
                    say(
                        ", ".join(
                            f"{n}{' (active)' if n == pred.active else ''}" for n in pred.adapters
                        )
                    )
                    continue
                if cmd == "/switch":
                    name = text.strip()[len("/switch") :].strip()
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
                    feedback.chat(
                        session.context_for_feedback(k), turn.answer, kind, fix, turn.adapter
                    )
                    turn.verdict, turn.fixed = kind, fix
                    say(
                        f"(marked {kind}; saved to {feedback.rejected_path if kind == 'bad' else feedback.path})"
                    )
                    continue
                if cmd.startswith("/") and cmd[1:].isalpha():
                    raise FtcliError(f"unknown command {cmd}", hint="/help lists them")
            except FtcliError as exc:
                say(f"! {exc.render()}")
                continue
            turn = Turn(text, "", adapter=pred.active)
            session.turns.append(turn)
            _answer(pred, session, turn, stdout, interactive, max_new_tokens, temperature)
            if turn.stopped:
                armed = True
                say("(stopped; Ctrl-C again or /quit to leave)")
            elif turn.cut:
                say(
                    f"(cut at {max_new_tokens} tokens: --max-new-tokens {2 * max_new_tokens} "
                    "allows longer answers)"
                )
    except KeyboardInterrupt:
        # the second Ctrl-C landed after the hint was printed but before the prompt read again
        # (a fast double press, or a loaded machine): it leaves as one at the prompt does
        if not armed:
            raise
        say("")
    finally:
        save_history()
    return {
        "turns": [t.__dict__ for t in session.turns],
        "feedback": dict(feedback.counts) if feedback else None,
        "feedback_file": str(feedback.path) if feedback else None,
    }


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _answer(pred, session, turn: Turn, stdout, interactive: bool, max_new, temperature) -> None:
    """Stream one answer to ``stdout``: a thinking mark (in a terminal) until the first piece."""
    prefix = f"{pred.active or 'model'}> "
    stdout.write(prefix + (THINKING if interactive else ""))
    stdout.flush()
    pieces: list[str] = []
    answer = contextlib.closing(pred.stream(session.messages()[:-1], max_new, temperature))
    try:
        with answer as items:  # leaving early closes the stream, which stops the generation
            for item in items:
                if isinstance(item, StreamEnd):
                    turn.cut = item.cut
                    continue
                if not pieces and interactive:
                    stdout.write(ERASE_LINE + prefix)
                pieces.append(item)
                stdout.write(item.lstrip() if not "".join(pieces[:-1]).strip() else item)
                stdout.flush()
    except KeyboardInterrupt:
        turn.stopped = True
    if not pieces and interactive:
        stdout.write(ERASE_LINE + prefix)
    stdout.write("\n")
    stdout.flush()
    turn.answer = "".join(pieces).strip()


def review_loop(
    pred: Predictor, rows: list[dict], stdin: TextIO, stdout: TextIO, feedback: FeedbackLog
) -> dict:
    """Show each prediction and read a verdict: /good, /bad, /fix ANSWER, or an empty line to skip."""
    labels = pred.label_names
    for r in rows:
        shown = r.get("text") or json.dumps(r.get("messages"), ensure_ascii=False)
        answer = r.get("label") if pred.task == "classification" else r.get("generation")
        stdout.write(
            f"\n{shown}\n  -> {answer}"
            + (f" ({r['score']:.1%})" if "score" in r else "")
            + (f" [adapter {r['adapter']}]" if r.get("adapter") else "")
            + "\n"
        )
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
                    raise FtcliError(
                        f"not a verdict: {line.strip()!r}", hint="/good, /bad or /fix ANSWER"
                    )
                kind, fix = verdict
                if pred.task == "classification":
                    pred.use(r.get("adapter"))
                    feedback.classification(
                        r["text"], answer, kind, pred.label_names or labels, fix, r.get("adapter")
                    )
                else:
                    ctx = r.get("messages") or [{"role": "user", "content": r["text"]}]
                    feedback.chat(ctx, answer, kind, fix, r.get("adapter"))
                stdout.write(f"  (marked {kind})\n")
                break
            except FtcliError as exc:
                stdout.write(f"  ! {exc.render()}\n")
    return dict(feedback.counts)


def review_predictions(
    pred: Predictor, rows: list[dict], path: Path | None, stdin: TextIO, stdout: TextIO, ui
) -> dict:
    """``ftcli predict --review``: a verdict on each prediction, written to ``path`` (default
    feedback.jsonl here); returns the record's ``feedback`` (counts) and ``feedback_file``."""
    log = FeedbackLog(path or Path("feedback.jsonl"), pred.source)
    result = {
        "feedback": review_loop(pred, rows, stdin, stdout, log),
        "feedback_file": str(log.path),
    }
    ui.info(f"feedback: {result['feedback']} -> {log.path}")
    return result
