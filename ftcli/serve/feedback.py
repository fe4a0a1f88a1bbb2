"""User feedback that becomes the next round of training data.

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
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.util import append_jsonl


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class FeedbackLog:
    """Appends verdicts on answers: trainable rows to ``path``, bad answers without a fix beside it."""

    def __init__(self, path: str | Path, model: str):
        self.path = Path(path)
        self.rejected_path = self.path.with_name(
            f"{self.path.stem}-rejected{self.path.suffix or '.jsonl'}"
        )
        self.model = model
        self.counts = {"good": 0, "fixed": 0, "bad": 0}

    def _write(self, row: dict, verdict: str, adapter: str | None) -> None:
        row.update(feedback=verdict, model=self.model, time=now())
        if adapter:
            row["adapter"] = adapter
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.rejected_path if verdict == "bad" else self.path, row)
        self.counts[verdict] += 1

    def classification(
        self,
        text: str,
        predicted: str,
        verdict: str,
        labels: list[str],
        correct: str | None = None,
        adapter: str | None = None,
    ) -> None:
        if verdict == "fixed":
            if correct not in labels:
                raise FtcliError(
                    f"{correct!r} is not one of the model's labels: {', '.join(labels)}"
                )
            self._write({"text": text, "label": correct, "predicted": predicted}, verdict, adapter)
        elif verdict == "good":
            self._write(
                {"text": text, "label": predicted, "predicted": predicted}, verdict, adapter
            )
        else:
            self._write({"text": text, "predicted": predicted}, verdict, adapter)

    def chat(
        self,
        context: list[dict],
        answer: str,
        verdict: str,
        correct: str | None = None,
        adapter: str | None = None,
    ) -> None:
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
