"""chat as a new user meets it (issue 16): answers stream, cut answers say so, Ctrl-C stops an
answer and a second one leaves, the run's system prompt and folder are the defaults, and in a
real terminal there is a thinking mark, readline history and a loading line."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import subprocess
import sys
import termios
import threading
import time

import pytest
import yaml

from ftcli.serve.chat import chat_loop, chat_run, run_system_prompt
from ftcli.serve.predictor import StreamEnd, load_predictor
from ftcli.util import read_jsonl
from tests.conftest import trained_run

Q = [{"role": "user", "content": "what is 2 plus 3 ?"}]


def test_stream_yields_pieces_as_they_come_and_can_be_stopped(
    tmp_path_factory, tiny_models, tiny_data
):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    pred = load_predictor(str(run))
    items = list(pred.stream(Q, max_new_tokens=12))
    *pieces, end = items
    assert isinstance(end, StreamEnd) and len(pieces) > 1 and not end.stopped
    assert "".join(pieces).strip() == pred.generate([Q], max_new_tokens=12)[0]
    # stopping after the first piece ends generation early: it really runs piece by piece
    stop = threading.Event()
    gen = pred.stream(Q, max_new_tokens=12, stop=stop)
    next(gen)
    stop.set()
    *_, end2 = list(gen)
    assert end2.stopped and end2.tokens < end.tokens
    cut = list(pred.stream(Q, max_new_tokens=2))[-1]
    assert cut.cut and cut.tokens == 2


class _CtrlC:
    """stdin whose "^C" lines are Ctrl-C at the prompt."""

    def __init__(self, lines):
        self.lines = list(lines)

    def readline(self):
        if not self.lines:
            return ""
        line = self.lines.pop(0)
        if line == "^C":
            raise KeyboardInterrupt
        return line + "\n"


class _InterruptOnHint(io.StringIO):
    """stdout that gets the second Ctrl-C while the first one's hint is being printed."""

    def write(self, s):
        if "Ctrl-C again" in s and not getattr(self, "fired", False):
            self.fired = True
            raise KeyboardInterrupt
        return super().write(s)


def test_a_second_ctrl_c_before_the_prompt_is_back_still_leaves_cleanly(
    tmp_path_factory, tiny_models, tiny_data
):
    """A double press (or a loaded machine) can put the second Ctrl-C between the hint and the
    next prompt, outside the read: it leaves normally (exit 0), not as an interrupted command."""
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    stdin = _CtrlC(["^C", "never read"])
    try:
        res = chat_loop(load_predictor(str(run)), stdin, _InterruptOnHint(), None, max_new_tokens=2)
    except KeyboardInterrupt:  # what the CLI turned into exit 130 (and would stop pytest)
        pytest.fail("the second Ctrl-C escaped chat_loop")
    assert res["turns"] == [] and stdin.lines == ["never read"]


class _InterruptOnPiece(io.StringIO):
    """stdout that gets Ctrl-C while the answer to turn ``n`` is being written."""

    def __init__(self, name: str, at_turn: int):
        super().__init__()
        self.name, self.at_turn, self.prefixes = name, at_turn, 0

    def write(self, s):
        if s == f"{self.name}> ":
            self.prefixes += 1
        elif self.prefixes == self.at_turn and s.strip() and not s.startswith("("):
            self.at_turn = -1
            raise KeyboardInterrupt
        return super().write(s)


def test_scripted_chat_ctrl_c_cut_and_one_adapter(
    tmp_path_factory, tiny_models, tiny_data, tmp_path
):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    pred = load_predictor(str(run))
    assert len(pred.adapters) == 1
    out = _InterruptOnPiece(pred.active, at_turn=1)
    stdin = _CtrlC(
        [
            "what is 2 plus 3 ?",
            "what is 1 plus 1 ?",
            "/switch b",
            "^C",
            "hello",
            "^C",
            "^C",
            "never read",
        ]
    )
    res = chat_loop(pred, stdin, out, None, max_new_tokens=2)
    text = out.getvalue()
    assert "/switch NAME to change" not in text  # one adapter: nothing to switch to
    assert "one model loaded: nothing to switch to" in text
    first, second, third = res["turns"]
    assert first["stopped"] and not second["stopped"]
    assert "(stopped; Ctrl-C again or /quit to leave)" in text
    assert second["cut"] and "(cut at 2 tokens: --max-new-tokens 4 allows longer answers)" in text
    assert "(Ctrl-C again or /quit to leave)" in text
    assert third["user"] == "hello"  # a single Ctrl-C at the prompt did not leave
    assert stdin.lines == ["never read"]  # the second Ctrl-C in a row did


def test_chat_defaults_come_from_the_run(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    assert chat_run(str(run), None) == run
    assert chat_run(str(run / "adapter"), None) == run
    assert chat_run(None, [f"a={run}"]) == run
    assert chat_run(str(tiny_models["llama"]), None) is None
    assert run_system_prompt(run) is None
    other = tmp_path / "run"
    other.mkdir()
    doc = yaml.safe_load((run / "recipe.yaml").read_text())
    doc["data"]["system_prompt"] = "You add numbers."
    (other / "recipe.yaml").write_text(yaml.safe_dump(doc))
    assert run_system_prompt(other) == "You add numbers."


def _expect(fd, pattern: bytes, seen: bytearray, start: int = 0, timeout: float = 240) -> int:
    """Read the terminal until ``pattern`` shows up after ``start``; returns where it ends."""
    end = time.monotonic() + timeout
    while pattern not in seen[start:]:
        left = end - time.monotonic()
        assert left > 0, f"{pattern!r} not seen in {bytes(seen[-2000:])!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"exited before {pattern!r}: {bytes(seen[-2000:])!r}"
            seen += chunk
    return seen.index(pattern, start) + len(pattern)


THINK = "thinking…".encode()


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pseudo-terminal on fd 0."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_chat_in_a_pseudo_terminal(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    master, slave = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FTCLI_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftcli", "chat", str(run), "--max-new-tokens", "4"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=tmp_path,
        env={**env, "TERM": "xterm"},
        close_fds=True,
        preexec_fn=_own_terminal,  # so that ^C on the terminal is a SIGINT to chat
    )
    os.close(slave)
    seen = bytearray()
    try:
        at = _expect(master, b"loading", seen)
        at = _expect(master, b"you> ", seen, at)
        os.write(master, b"what is 3 plus 3 ?\r")
        at = _expect(master, THINK, seen, at)
        at = _expect(master, b"\r\x1b[K", seen, at)  # the mark is erased at the first piece
        at = _expect(master, b"you> ", seen, at)
        os.write(master, b"/good\r")
        at = _expect(master, f"saved to {run / 'feedback.jsonl'}".encode(), seen, at)
        at = _expect(master, b"you> ", seen, at)
        os.write(master, b"\x1b[A\x1b[A\r")  # readline history: up twice, the question again
        at = _expect(master, THINK, seen, at)
        at = _expect(master, b"you> ", seen, at)
        hint = b"(Ctrl-C again or /quit to leave)"
        for _ in range(10):  # Ctrl-C at the prompt: a hint, the session goes on
            os.write(master, b"\x03")  # (re-sent if it reached readline before its handler)
            try:
                # long enough that a loaded machine's slow answer is not taken for a lost ^C
                # (a re-sent one is "Ctrl-C again" and ends the session)
                at = _expect(master, hint, seen, at, timeout=45)
                break
            except AssertionError:
                continue
        assert hint in seen and proc.poll() is None
        os.write(master, b"\x03")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    questions = seen.count(b"what is 3 plus 3 ?")
    assert seen.count(THINK) == 2 and questions == 2  # typed once, recalled once
    (row,) = read_jsonl(run / "feedback.jsonl")
    assert row["messages"][0] == {"role": "user", "content": "what is 3 plus 3 ?"}
    (run / "feedback.jsonl").unlink()  # the cached run is shared with other tests
    assert (tmp_path / "cache" / "chat_history").read_text().count("what is 3 plus 3 ?") == 2
