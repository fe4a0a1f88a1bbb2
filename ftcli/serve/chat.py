"""The terminal loops: ``chat`` (a conversation with slash commands for feedback and adapters)
and ``predict --review`` (a verdict on each prediction)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

from ftcli.errors import FtcliError
from ftcli.serve.feedback import FeedbackLog, parse_verdict
from ftcli.serve.predictor import Predictor

COMMANDS_HELP = (
    "/good  mark the last answer good    /bad  mark it bad    /fix TEXT  give the right answer\n"
    "/switch NAME  use another adapter    /adapters  list them    /reset  new conversation\n"
    "/help  this list    /quit  leave (or Ctrl-D)"
)


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


def chat_loop(
    pred: Predictor,
    stdin: TextIO,
    stdout: TextIO,
    feedback: FeedbackLog | None = None,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
) -> dict:
    """Read lines from ``stdin``, answer on ``stdout``; slash commands mark answers and switch adapters.
    Returns the transcript and the feedback counts."""
    if pred.task != "causal_lm":
        raise FtcliError(
            "chat is for causal language models; this one is a classifier",
            hint="use ftcli predict MODEL --text '...'",
        )
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
                say(
                    ", ".join(
                        f"{n}{' (active)' if n == pred.active else ''}" for n in pred.adapters
                    )
                    or "(no adapters: a single model)"
                )
                continue
            if cmd == "/switch":
                name = text.strip()[len("/switch") :].strip()
                if not pred.adapters:
                    raise FtcliError(
                        "no adapters to switch between",
                        hint="start chat with --adapter A --adapter B",
                    )
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
                say(
                    f"(marked {kind}; saved to {feedback.rejected_path if kind == 'bad' else feedback.path})"
                )
                continue
            if cmd.startswith("/") and cmd[1:].isalpha():
                raise FtcliError(f"unknown command {cmd}", hint="/help lists them")
        except FtcliError as exc:
            say(f"! {exc.render()}")
            continue
        session.turns.append(Turn(text, "", adapter=pred.active))
        answer = pred.generate(
            [session.messages()[:-1]], max_new_tokens=max_new_tokens, temperature=temperature
        )[0]
        session.turns[-1].answer = answer
        say(f"{pred.active or 'model'}> {answer}")
    return {
        "turns": [t.__dict__ for t in session.turns],
        "feedback": dict(feedback.counts) if feedback else None,
        "feedback_file": str(feedback.path) if feedback else None,
    }


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
