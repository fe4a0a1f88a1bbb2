"""The report files, and report.html opened in a real headless Chromium (DevTools protocol over a
pipe): every section and plot must render, with no script error, console error or network request."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ftcli.data.examples import PreparedData
from ftcli.evaluation.compare import analyse, assemble
from ftcli.evaluation.report import write_report
from ftcli.evaluation.score import Scored
from ftcli.recipe import recipe_from_mapping
from ftcli.rundir import RunDir
from tests.conftest import tiny_recipe

SECTIONS = [
    "summary",
    "significance",
    "metrics",
    "curves",
    "confusion",
    "per-class",
    "failures",
    "robustness",
]
PLOTS = ["significance", "curves", "confusion", "per_class", "by_length", "robustness"]


class Chromium:
    """Headless Chromium driven through --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, exe: str, profile: Path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # move the child's ends out of the way, then onto fds 3 and 4 in the child
        a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 20)
        b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 20)
        os.close(to_child_r)
        os.close(from_child_w)

        def wire():
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # close_fds=False: fds 3 and 4 (made by dup2, inheritable) must survive; Python's own fds
            # are non-inheritable (PEP 446) and close at exec, as do a and b (CLOEXEC)
            preexec_fn=wire,
            close_fds=False,
        )
        os.close(a)
        os.close(b)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 60,
    ) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(timeout)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # it may already be gone; the wait below settles it
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def chromium_exe() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI") == "true":
        pytest.fail(
            "chromium is needed to test report.html in a real browser: apt-get install -y chromium"
        )
    pytest.skip("chromium is not installed (apt-get install -y chromium); CI runs this test")


def render(html: Path, profile: Path, width: int = 1280) -> tuple[dict, list[dict]]:
    """Open ``html`` in a window ``width`` CSS pixels wide; return what the page shows (sections,
    plots, overflow) and the problems it reported."""
    browser = Chromium(chromium_exe(), profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.send("Page.navigate", {"url": html.as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        expr = """JSON.stringify({
          title: document.title,
          sections: Array.from(document.querySelectorAll('section')).map(s => ({id: s.id,
              height: s.getBoundingClientRect().height, heading: (s.querySelector('h1,h2')||{}).textContent})),
          plots: Array.from(document.images).map(i => ({plot: i.dataset.plot, complete: i.complete,
              width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width})),
          tables: document.querySelectorAll('table').length,
          verdict: (document.querySelector('.verdict')||{}).textContent,
          text: document.body.innerText,
          page_overflow: document.documentElement.scrollWidth - window.innerWidth,
          viewport: window.innerWidth,
          per_class_headers: Array.from(document.querySelectorAll('#per-class th')).map(t => t.textContent),
          external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') ||
              e.getAttribute('href')).filter(u => !u.startsWith('data:') && !u.startsWith('#')),
        })"""
        page = json.loads(
            browser.send(
                "Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session
            )["result"]["value"]
        )
        problems = [
            e
            for e in browser.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (
                e.get("method") == "Runtime.consoleAPICalled"
                and e["params"]["type"] in ("error", "assert")
            )
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
            or e.get("method") == "Network.loadingFailed"
            or (
                e.get("method") == "Network.requestWillBeSent"
                and not e["params"]["request"]["url"].startswith(("file:", "data:", "about:"))
            )
        ]
        return page, problems
    finally:
        browser.close()


def synthetic_report(
    tmp_path: Path, labels: tuple[str, ...] = ("neg", "neu", "pos"), baseline: str = "base"
) -> tuple[dict, list[dict]]:
    """A real analysis (metrics, statistics, failures, curves) of two made-up classifiers."""
    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 3, n)
    base = rng.dirichlet([1, 1, 1], n)
    tuned = np.where(
        rng.random((n, 1)) < 0.75, np.eye(3)[y] * 0.7 + 0.1, rng.dirichlet([1, 1, 1], n)
    )
    recipe = recipe_from_mapping(
        tiny_recipe(tmp_path, {"bert": "some/model"}, {"classification": "x.csv"})
    )
    labels = list(labels)
    examples = [
        {"text": "word " * int(rng.integers(3, 40)) + f"<b>{i}</b> & 'q'", "label": labels[t]}
        for i, t in enumerate(y)
    ]
    rd = RunDir(
        tmp_path / "run",
        recipe,
        PreparedData({"train": [], "validation": [], "test": examples}, labels),
    )
    feats = [
        {"input_ids": [1] * (len(e["text"].split()) + 2), "labels": int(t)}
        for e, t in zip(examples, y, strict=True)
    ]
    result = analyse(
        rd,
        feats,
        list(range(n)),
        Scored("fine-tuned", "classification", probs=tuned.tolist()),
        Scored("base", "classification", probs=base.tolist()),
        999,
        0,
    )
    curves = [{"step": s, "loss": 1.0 / (1 + s / 20)} for s in range(2, 101, 2)]
    curves += [
        {"step": s, "val_loss": v}
        for s, v in zip(range(20, 101, 20), [0.8, 0.6, 0.62, 0.7, 0.8], strict=True)
    ]
    extra = {
        "robustness": {
            "applies": True,
            "rows": [
                {
                    "perturbation": p,
                    "accuracy": a,
                    "macro_f1": a,
                    "accuracy_change": a - 0.8,
                    "prediction_flips": 0.1,
                }
                for p, a in (
                    ("lowercase", 0.8),
                    ("uppercase", 0.7),
                    ("char_noise", 0.75),
                    ("truncated", 0.6),
                    ("appended_text", 0.78),
                )
            ],
        },
        "stress": [{"case": "empty input", "ok": True, "result": "predicted neg (p=0.5)"}],
    }
    info = {"kind": baseline, "name": baseline, "description": "the base <model> & its fresh head"}
    return assemble(rd, info, result, curves, extra, 999, 0), result["predictions"]


def test_report_files_are_written_together(tmp_path):
    report, preds = synthetic_report(tmp_path)
    files = write_report(report, preds, tmp_path / "eval")
    assert sorted(Path(f).name for f in files.values()) == [
        "predictions.jsonl",
        "report.html",
        "report.json",
        "report.md",
    ]
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["verdict"] == report["verdict"] == "improved"
    assert saved["overfitting"]["overfitting"] and saved["overfitting"]["best_step"] == 40
    rows = [json.loads(x) for x in Path(files["predictions"]).read_text().splitlines()]
    assert len(rows) == 120 and {"baseline", "tuned", "outcome", "text", "label"} <= set(rows[0])
    md = Path(files["markdown"]).read_text()
    for heading in (
        "## Significance",
        "## Overfitting",
        "## Failures",
        "## Robustness",
        "### Regressions",
    ):
        assert heading in md
    assert "**Warning.**" in md and "McNemar exact" in md


@pytest.mark.parametrize("width", [1280, 420])
def test_report_html_renders_in_chromium(tmp_path, width):
    report, preds = synthetic_report(tmp_path, baseline="probe")
    files = write_report(report, preds, tmp_path / "eval")
    page, problems = render(Path(files["html"]), tmp_path / "profile", width)
    assert problems == []
    shown = {s["id"]: s for s in page["sections"]}
    assert list(shown) == SECTIONS
    assert all(s["height"] > 20 and s["heading"] for s in shown.values())
    plots = {p["plot"]: p for p in page["plots"]}
    assert set(plots) == set(PLOTS)
    for p in plots.values():  # decoded by the browser and laid out on the page, inside the window
        assert p["complete"] and p["width"] > 200 and p["height"] > 100 and p["shown"] > 100, p
        assert p["shown"] <= page["viewport"], p
    # nothing widens the page past the window: wide tables scroll inside their own box
    assert page["page_overflow"] <= 0, page["page_overflow"]
    assert page["external"] == [] and page["tables"] >= 8
    assert page["verdict"].startswith("Verdict (accuracy): improved")
    assert "<b>" not in page["title"]
    # the per-class table names the baseline it compares with, not "(base)" for any baseline
    assert page["per_class_headers"][1:3] == ["precision (probe)", "precision (fine-tuned)"]
    assert "calibration_error (lower is better)" in page["text"]
    assert "Majority rate" not in page["text"]  # this made-up report has no training split


def test_plots_keep_their_text_apart_and_on_the_canvas(tmp_path):
    """Titles, axis labels and tick labels: none overlaps another, none falls off the figure
    (before: the per-class suptitle sat on the 'recall' panel title, x labels fell off)."""
    from ftcli.evaluation.report import figures

    for labels in (("neg", "neu", "pos"), ("billing question", "technical support request", "x")):
        report, _ = synthetic_report(tmp_path / labels[0].replace(" ", "-"), labels=labels)
        figs = figures(report)
        assert set(figs) == set(PLOTS)
        for name, fig in figs.items():
            assert layout_problems(fig) == [], (name, labels)


def drawn_texts(fig) -> list:
    """The text a figure draws around its plots: titles, axis labels, the tick labels inside the
    view, legends (not the numbers written inside a plot area)."""
    texts = [fig._suptitle] if fig._suptitle else []
    for leg in fig.legends:
        texts += leg.get_texts()
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):
            texts += [t.label1 for t in axis._update_ticks() if t.label1.get_visible()]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def layout_problems(fig) -> list[str]:
    """Text that collides with other text, or falls off the canvas, as drawn."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    c = fig.bbox
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in drawn_texts(fig)]
    out = [
        f"clipped: {name!r}"
        for name, b in boxes
        if b.x0 < c.x0 - 1 or b.y0 < c.y0 - 1 or b.x1 > c.x1 + 1 or b.y1 > c.y1 + 1
    ]
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1 :]:
            if (
                min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > 1
                and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > 1
            ):
                out.append(f"overlap: {a!r} / {b!r}")
    return out


def test_a_broken_plot_is_caught(tmp_path):
    """The browser check itself must fail on an image that does not decode."""
    report, preds = synthetic_report(tmp_path)
    files = write_report(report, preds, tmp_path / "eval")
    html = Path(files["html"])
    text = html.read_text()
    start = text.index('data-plot="curves"')
    src = text.index("base64,", start) + len("base64,")
    html.write_text(text[:src] + "bm90IGEgcG5n" + text[text.index('"', src) :])  # "not a png"
    page, _ = render(html, tmp_path / "profile")
    broken = [p for p in page["plots"] if p["plot"] == "curves"][0]
    assert broken["width"] == 0
