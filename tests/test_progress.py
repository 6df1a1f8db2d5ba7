"""Progress output (a few whole lines without a terminal, a tqdm bar on one, nothing when switched off) and the
automatic CPU thread count."""
import io

import pytest
import torch

import unif2ace.progress as progress
import unif2ace.threads as threads
from unif2ace.progress import LogProgress, progress_bar, set_progress


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def run(bar, clock, seconds_per_item):
    for _ in bar:
        clock.t += seconds_per_item


def test_long_loop_writes_quarters_and_a_summary(clock):
    out = io.StringIO()
    bar = LogProgress(range(3000), desc="train", total=3000, stream=out)
    for i in bar:
        clock.t += 0.15
        if i == 10:
            bar.set_postfix(loss="3.210")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 4, lines                    # 25 %, 50 %, 75 %, done
    assert lines[0].startswith("train: at 750/3000 (25%)") and "loss=3.210" in lines[0]
    assert lines[-1].startswith("train: done 3000/3000 in 450.0s, 0.15s/it")


def test_short_loop_is_quiet_and_resumed_loop_counts_from_initial(clock):
    out = io.StringIO()
    run(LogProgress(range(50), desc="quick", total=50, stream=out), clock, 0.01)
    assert out.getvalue() == ""                      # under MIN_SUMMARY_S: no line at all
    out = io.StringIO()
    run(LogProgress(range(100, 200), desc="resumed", total=200, initial=100, stream=out), clock, 1.0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("resumed: at 150/200 (75%)") and lines[-1].startswith("resumed: done 200/200 in 100.0s")


def test_unknown_length_writes_a_line_per_interval(clock):
    out = io.StringIO()
    bar = LogProgress(iter(range(500)), desc="stream", stream=out)
    run(bar, clock, 1.0)                             # 500 s, one line per LOG_INTERVAL_S = 60 s, then the summary
    lines = out.getvalue().splitlines()
    assert len(lines) == 500 // int(progress.LOG_INTERVAL_S) + 1
    assert lines[-1].startswith("stream: done 500 in 500.0s")


def test_switches(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    from tqdm import tqdm

    assert isinstance(progress_bar(range(3)), tqdm)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(progress_bar(range(3)), LogProgress)
    set_progress(False)
    try:
        bar = progress_bar(range(3))
        assert isinstance(bar, LogProgress) and bar.silent
        assert list(bar) == [0, 1, 2]
    finally:
        set_progress(True)
    assert progress_bar(range(3), disable=True).silent


def test_auto_threads(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.auto_threads()[0] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.auto_threads()[0] == 2                  # torchrun: the cores are shared among local processes
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    n, why = threads.auto_threads()
    assert n == 1 and "busy" in why                        # load above 3/4 of the cores


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1).startswith("1 CPU thread (") and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            threads.set_threads(-1)
    finally:
        torch.set_num_threads(before)
