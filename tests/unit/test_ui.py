"""Long phases print counts when the output is not a terminal (issue 16, point 7)."""

from __future__ import annotations


def test_a_long_phase_prints_counts_when_not_a_terminal(monkeypatch, capsys):
    import ftcli.ui

    now = [0.0]
    monkeypatch.setattr(ftcli.ui.time, "monotonic", lambda: now[0])
    ui = ftcli.ui.UI()
    with ui.counter("probe: base features", 640) as advance:
        for t in (4.0, 11.0, 12.0, 30.0, 31.0):  # seconds at which each batch of 128 ends
            now[0] = t
            advance(128)
    assert capsys.readouterr().out.splitlines() == [
        "probe: base features: 0/640",
        "probe: base features: 256/640",
        "probe: base features: 512/640",
        "probe: base features: 640/640 done",
    ]


def test_training_counts_steps_before_the_first_log_step(monkeypatch, capsys):
    import ftcli.ui

    now = [0.0]
    monkeypatch.setattr(ftcli.ui.time, "monotonic", lambda: now[0])
    bar = ftcli.ui.UI().progress()
    bar.start(5)
    for step, t in ((1, 5.0), (2, 12.0), (3, 13.0)):  # one slow step each, log_every 4
        now[0] = t
        bar.update(step)
    now[0] = 30.0
    bar.update(4, loss=0.5, lr=1e-3, tps=100.0)
    bar.stop()
    assert capsys.readouterr().out.splitlines() == [
        "train: 5 optimizer steps",
        "step 2/5",
        "step 4/5  loss 0.5000  lr 1.00e-03  100 tok/s",
    ]
