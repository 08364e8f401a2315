"""Progress shows in logs: without a terminal, a line every LOG_EVERY_S seconds and at each tenth."""

from __future__ import annotations

import io

from rich.console import Console

from bench import console


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_log_progress_prints_tenths_and_every_interval(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buf, width=200))
    clock = FakeClock()
    p = console.LogProgress("train jem", 100, every_s=30.0, clock=clock)
    for _ in range(9):                 # 9 steps in 9 s: below a tenth and below 30 s
        clock.t += 1.0
        p.update(1, loss=0.5)
    assert buf.getvalue() == ""
    clock.t += 1.0
    p.update(1, loss=0.25)             # step 10: a tenth
    lines = buf.getvalue().splitlines()
    assert lines == ["train jem: 10/100 (10%) 1/s elapsed 10s ETA 1m30s loss=0.25"]
    clock.t += 31.0                    # 31 s later, within the same tenth: the interval prints
    p.update(1)
    assert buf.getvalue().splitlines()[-1].startswith("train jem: 11/100 (11%)")
    for _ in range(89):
        clock.t += 0.01
        p.update(1)
    last = buf.getvalue().splitlines()
    assert last[-1].startswith("train jem: 100/100 (100%)") and "ETA" not in last[-1]
    assert len(last) == 11             # 10 tenths and one interval line


def test_progress_is_lines_without_a_terminal_and_silent_when_quiet(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buf, width=200))
    monkeypatch.delenv("BENCH_QUIET", raising=False)
    with console.progress("sample wrn", 4) as update:
        for _ in range(4):
            update(1)
    assert [ln.split(" ")[2] for ln in buf.getvalue().splitlines()] == ["1/4", "2/4", "3/4", "4/4"]
    buf.truncate(0)
    buf.seek(0)
    monkeypatch.setenv("BENCH_QUIET", "1")
    with console.progress("sample wrn", 4) as update:
        update(4)
    assert buf.getvalue() == ""


def test_duration_format():
    assert [console.duration(s) for s in (0, 59.4, 60, 185, 3600, 7620)] == ["0s", "59s", "1m00s", "3m05s",
                                                                           "1h00m", "2h07m"]
