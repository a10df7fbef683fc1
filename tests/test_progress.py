"""What `farm run` shows while the grid runs (farm/progress.py): the grid's counts and ETA, the
live view in a pseudo-terminal, plain lines without one."""

import io
import os
import pty

from farm.progress import Grid, Lines, Live, view


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def two_trials(clock):
    # a pretrain both trials share (estimated 10 s), then each its own SFT (20 s)
    return Grid(
        {"a": [("pretrain", "p", 10.0), ("sft", "sa", 20.0)], "b": [("pretrain", "p", 10.0), ("sft", "sb", 20.0)]}, finished_before=1, clock=clock
    )


def test_eta_is_the_plans_work_left_at_the_pace_measured_so_far():
    clock = Clock()
    grid = two_trials(clock)
    assert grid.eta() is None and grid.counts() == {"done": 0, "running": 0, "pending": 2, "failed": 0}
    grid.started("a")
    clock.now += 10
    grid.step("a", "sft", 5, 10)  # the pretrain is done (10), half of a's SFT (10): 20 s of work in 10 s
    assert grid.where["a"] == ("sft", 5, 10)
    assert grid.eta() == (10 + 20) / 2  # a's other half and b's SFT, shared pretrain counted once
    clock.now += 5
    grid.ended("a", ok=True)
    assert grid.eta() == 20 / (30 / 15)
    grid.ended("b", ok=False)  # a failed trial's work is no longer ahead
    assert grid.eta() == 0 and grid.counts() == {"done": 1, "running": 0, "pending": 0, "failed": 1}
    assert "1 done (+1 finished before), 0 running, 0 pending, 1 failed" in grid.summary()


def test_without_estimates_the_eta_counts_trials_that_train():
    clock = Clock()
    grid = Grid({**{t: [("sft", t, None)] for t in "abcd"}, "reused": []}, clock=clock)
    grid.ended("reused", ok=True)  # all its stages in the store: it ends at once and tells nothing
    assert grid.eta() is None
    grid.started("a")
    clock.now += 30
    assert grid.eta() is None
    grid.ended("a", ok=True)
    assert grid.eta() == 30 * 3
    for t in "bcd":
        grid.ended(t, ok=True)
    assert grid.eta() == 0


def test_the_live_view_redraws_in_a_pseudo_terminal():
    master, slave = pty.openpty()
    out = os.fdopen(slave, "w", encoding="utf-8")
    grid = two_trials(Clock())
    shown = view(grid, out)
    assert isinstance(shown, Live)
    grid.started("a")
    grid.step("a", "sft", 3, 10)
    shown.step("a", "sft step 3/10 loss 1.2")
    shown.live.refresh()  # (rich redraws twice a second on its own)
    grid.ended("a", ok=True)
    shown.ended("a", "done reward_accuracy=0.6")
    shown.live.refresh()
    shown.close()
    out.flush()
    text = b""
    os.set_blocking(master, False)
    try:
        while chunk := os.read(master, 65536):
            text += chunk
    except BlockingIOError:
        pass
    out.close()
    os.close(master)
    text = text.decode()
    assert "\x1b[" in text  # drawn with cursor moves, in place
    assert "sft" in text and "3/10" in text and "ETA" in text  # a running trial's stage and step
    assert "a: done reward_accuracy=0.6" in text and "1 done (+1 finished before), 0 running, 1 pending" in text
    assert "sft step 3/10 loss" not in text and "[bold]" not in text  # training logs live in the view; markup is rendered


def test_without_a_terminal_the_view_is_plain_lines():
    out = io.StringIO()
    grid = two_trials(Clock())
    shown = view(grid, out)
    assert isinstance(shown, Lines)
    grid.started("a")
    shown.step("a", "sft step 3/10 loss 1.2")
    grid.ended("a", ok=True)
    shown.ended("a", "done reward_accuracy=0.6")
    shown.close()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and len(lines) == 3
    assert lines[0].endswith("a: sft step 3/10 loss 1.2") and lines[1].endswith("a: done reward_accuracy=0.6")
    assert "grid: 1 done (+1 finished before), 0 running, 1 pending, 0 failed" in lines[2]
