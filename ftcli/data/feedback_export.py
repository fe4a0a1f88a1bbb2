"""``ftcli feedback export``: the verdicts ``chat`` and ``serve`` recorded (serve/feedback.py) as
preference data that ``task: preference`` reads as written.

A ``/fix`` row becomes a pair (prompt, chosen = the fix, rejected = the model's answer); ``/good``
and ``/bad`` rows become KTO rows (prompt, completion, label desirable/undesirable). The same row
given twice is kept once and counted; a prompt+answer voted both ways (good, and bad or fixed) is
a conflict: every row that votes on it is left out, and counted, never merged by a rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.util import write_jsonl

FEEDBACK = "feedback.jsonl"  # what chat writes into a run folder (serve: the --feedback file)


def rejected_beside(path: Path) -> Path:
    """The file FeedbackLog puts a feedback file's /bad rows in: ``<stem>-rejected<suffix>``."""
    return path.with_name(f"{path.stem}-rejected{path.suffix or '.jsonl'}")


def feedback_files(sources: list[str]) -> list[Path]:
    """The files to read: a run folder's feedback.jsonl and feedback-rejected.jsonl, a file and
    its -rejected file beside it (when there), each once."""
    files: list[Path] = []
    for spec in sources:
        p = Path(spec)
        if p.is_dir():
            found = [f for f in (p / FEEDBACK, rejected_beside(p / FEEDBACK)) if f.is_file()]
            if not found:
                raise FtcliError(
                    f"{p}: no feedback files ({FEEDBACK} or {rejected_beside(Path(FEEDBACK))})",
                    hint="chat writes them with /good, /bad and /fix (ftcli chat RUN --feedback "
                    "FILE puts them elsewhere: name that file)",
                )
        elif p.is_file():
            found = [p]
            beside = rejected_beside(p)
            if not p.stem.endswith("-rejected") and beside.is_file():
                found.append(beside)
        else:
            raise FtcliError(f"{spec}: no such run folder or feedback file")
        for f in found:
            if f.resolve() not in {g.resolve() for g in files}:
                files.append(f)
    return files


@dataclass
class Export:
    """What the export found, kept, and left out (the command prints it, --json returns it)."""

    files: list[str] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=lambda: {"good": 0, "bad": 0, "fixed": 0})
    pairs: int = 0
    kto_rows: int = 0
    duplicates: int = 0
    conflicts: int = 0  # prompt+answer voted both ways
    conflicting_rows: int = 0  # the rows left out for them
    skipped: dict[str, int] = field(default_factory=dict)  # rows that hold no preference

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "read": self.read,
            "pairs": self.pairs,
            "kto_rows": self.kto_rows,
            "kto_only": self.kto_rows > 0 and self.pairs == 0,
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "conflicting_rows": self.conflicting_rows,
            "skipped": self.skipped,
        }


def _read(path: Path):
    """A feedback file's rows; a last line cut short (a server appending to it) is left out,
    any other line that is not JSON is an error naming it."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise FtcliError(f"{path}: cannot read it ({exc})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # no newline after it yet: still being written
                continue
            raise FtcliError(
                f"{path}:{i + 1}: not a JSON line ({exc.msg})",
                hint="a feedback file holds one JSON object per line: fix or remove that line",
            ) from None


def _verdict(row: dict) -> str | None:
    """good | bad | fixed for a chat feedback row (by its ``feedback`` field, else its shape);
    None for a row that is not chat feedback (a classifier's)."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in msgs
    ):
        return None
    ends_in_answer = bool(msgs) and msgs[-1]["role"] == "assistant"
    verdict = row.get("feedback")
    if verdict in ("good", "bad", "fixed"):
        return verdict
    if ends_in_answer:
        return "fixed" if isinstance(row.get("rejected"), str) else "good"
    return "bad" if isinstance(row.get("rejected"), str) else None


def _skip(out: Export, why: str) -> None:
    out.skipped[why] = out.skipped.get(why, 0) + 1


def _rows_of(row: dict, out: Export) -> tuple[dict, list[tuple[str, str, int]]] | None:
    """(the output row, its votes: (prompt key, answer, +1 | -1)) of one feedback row, or None
    (counted in ``out.skipped``)."""
    verdict = _verdict(row)
    if verdict is None:
        _skip(out, "not chat feedback (a classifier's)" if "text" in row else "not chat feedback")
        return None
    out.read[verdict] += 1
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
    if verdict == "bad":
        prompt, answer = msgs, row.get("rejected")
    elif msgs and msgs[-1]["role"] == "assistant":
        prompt, answer = msgs[:-1], msgs[-1]["content"]
    else:
        _skip(out, f"a {verdict} row without the answer")
        return None
    if not prompt:
        _skip(out, f"a {verdict} row without a prompt")
        return None
    key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    if verdict == "fixed":
        original = row.get("rejected")
        if not isinstance(original, str) or not original.strip() or not answer.strip():
            _skip(out, "a fix without the answer it fixes")
            return None
        if original.strip() == answer.strip():
            _skip(out, "a fix equal to the answer")
            return None
        pair = {"prompt": prompt, "chosen": answer, "rejected": original}
        return pair, [(key, original.strip(), -1), (key, answer.strip(), +1)]
    if not isinstance(answer, str) or not answer.strip():
        _skip(out, f"a {verdict} row with an empty answer")
        return None
    label = "desirable" if verdict == "good" else "undesirable"
    kto = {"prompt": prompt, "completion": answer, "label": label}
    return kto, [(key, answer.strip(), +1 if verdict == "good" else -1)]


def collect(files: list[Path]) -> tuple[list[dict], Export]:
    """The preference rows of the feedback files, in the order given, and the tally."""
    out = Export(files=[str(f) for f in files])
    made: list[tuple[dict, list]] = []
    seen: set[str] = set()
    for f in files:
        for row in _read(f):
            got = _rows_of(row, out) if isinstance(row, dict) else None
            if got is None:
                continue
            text = json.dumps(got[0], sort_keys=True, ensure_ascii=False)
            if text in seen:
                out.duplicates += 1
                continue
            seen.add(text)
            made.append(got)
    signs: dict[tuple[str, str], set[int]] = {}
    for _, votes in made:
        for key, answer, sign in votes:
            signs.setdefault((key, answer), set()).add(sign)
    torn = {k for k, s in signs.items() if len(s) > 1}
    out.conflicts = len(torn)
    rows = []
    for row, votes in made:
        if any((key, answer) in torn for key, answer, _ in votes):
            out.conflicting_rows += 1
            continue
        rows.append(row)
        if "chosen" in row:
            out.pairs += 1
        else:
            out.kto_rows += 1
    return rows, out


def export(sources: list[str], dest: Path) -> Export:
    """Read the feedback of ``sources`` (run folders or files) and write the preference rows to
    ``dest`` (atomically: a temporary file renamed into place)."""
    files = feedback_files(sources)
    rows, out = collect(files)
    if not rows:
        why = (
            f"{out.conflicting_rows} left out as conflicting votes"
            if out.conflicting_rows
            else "no /good, /bad or /fix verdict on a chat answer"
        )
        raise FtcliError(
            f"no preference data in {', '.join(out.files)}: {why}",
            hint="rate chat answers with /good, /bad or /fix ANSWER first",
        )
    write_jsonl(Path(dest), rows)
    return out


def summary(out: Export) -> list[str]:
    """What the export says: kept, left out, and which preference.loss trains on the file."""
    r = out.read
    lines = [
        f"read {r['fixed']} /fix, {r['good']} /good, {r['bad']} /bad from "
        f"{len(out.files)} file{'s' if len(out.files) != 1 else ''}",
        f"wrote {out.pairs} pairs (/fix) and {out.kto_rows} KTO rows (/good, /bad)",
    ]
    if out.duplicates:
        lines.append(f"left out {out.duplicates} duplicate rows (kept once)")
    if out.conflicts:
        lines.append(
            f"left out {out.conflicting_rows} rows: {out.conflicts} prompt+answer "
            f"voted both good and bad (or fixed): conflicting votes are not merged"
        )
    for why, n in out.skipped.items():
        lines.append(f"skipped {n} rows: {why}")
    if out.pairs == 0:
        lines.append(
            "KTO-only (no /fix pairs): train with preference.loss kto "
            "(--set preference.loss=kto); the pair losses need pairs"
        )
    elif out.kto_rows:
        lines.append(
            "pairs and KTO rows: preference.loss kto trains on all of them; the pair losses "
            "(dpo, ipo, simpo, orpo) and task reward on the pairs (the KTO rows are counted "
            "and dropped)"
        )
    return lines
