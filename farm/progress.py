"""What `farm run` shows while the grid runs: on a terminal, a live view (trials done / running /
pending / failed, each running trial's stage and step, an ETA); elsewhere (a log, CI, `ray job
logs`) plain lines. The grid's Tune callback (farm.tune.Progress) feeds it; nothing here knows Ray.

The ETA counts work in `farm plan`'s unit (farm.estimate: a stage's seconds at the plan's nominal
throughput, known for CPU stages too) and corrects it by the pace measured in this run: work done
so far (stages finished, and the running ones by step) over the time it took, so concurrency,
the machine's real speed and the overheads the plan leaves out (evaluation, start-up) are in it.
Until some work is done, or where no stage has an estimate, it counts finished trials instead
(those that train something: one whose stages are all in the store ends at once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STATES = ("done", "running", "pending", "failed")


@dataclass
class Grid:
    """The grid's state. `work`: per trial, its stages still to run as (stage name, key, estimated
    seconds or None); a key shared by several trials is one piece of work."""

    work: dict[str, list[tuple[str, str, float | None]]]
    finished_before: int = 0
    clock: object = time.monotonic
    where: dict[str, tuple[str, int, int]] = field(default_factory=dict, init=False)  # running trial: (stage, step, max_steps)
    progress: dict[str, float] = field(default_factory=dict, init=False)  # stage key: fraction done

    def __post_init__(self):
        self.start = self.clock()
        self.state = {t: "pending" for t in self.work}
        self.cost = {key: s for stages in self.work.values() for _, key, s in stages if s}  # estimated seconds per key

    def started(self, trial: str) -> None:
        self.state[trial] = "running"

    def step(self, trial: str, stage: str, step: int, max_steps: int) -> None:
        self.state[trial], self.where[trial] = "running", (stage, step, max_steps)
        for name, key, _ in self.work[trial]:  # the stages before this one are done
            if name == stage:
                self.progress[key] = max(self.progress.get(key, 0.0), min(1.0, step / max(max_steps, 1)))
                break
            self.progress[key] = 1.0

    def ended(self, trial: str, ok: bool) -> None:
        self.state[trial] = "done" if ok else "failed"
        self.where.pop(trial, None)
        if ok:
            for _, key, _ in self.work[trial]:
                self.progress[key] = 1.0

    def counts(self) -> dict[str, int]:
        return {s: sum(v == s for v in self.state.values()) for s in STATES}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> float | None:
        """Seconds left, or None while nothing has been measured."""
        elapsed = self.elapsed()
        live = {key for t, stages in self.work.items() if self.state[t] != "failed" for _, key, _ in stages}
        done = sum(self.cost[k] * self.progress.get(k, 0.0) for k in self.cost)
        left = sum(self.cost[k] * (1 - self.progress.get(k, 0.0)) for k in self.cost if k in live)
        if done > 0 and elapsed > 0:
            return left / (done / elapsed)
        # Trials that train something (a trial whose stages are all in the store ends at once and says nothing of the pace)
        training = [self.state[t] for t, stages in self.work.items() if stages]
        ended, ahead = sum(s in ("done", "failed") for s in training), sum(s in ("running", "pending") for s in training)
        return 0.0 if not ahead else elapsed / ended * ahead if ended else None

    def summary(self) -> str:
        c = self.counts()
        eta = self.eta()
        before = f" (+{self.finished_before} finished before)" if self.finished_before else ""
        return (
            f"{c['done']} done{before}, {c['running']} running, {c['pending']} pending, {c['failed']} failed; "
            f"{duration(self.elapsed())} elapsed, ETA {duration(eta) if eta is not None else '-'}"
        )


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Lines:
    """Plain lines: each training log, trial end and error, and the grid's summary after each
    trial that ends."""

    def __init__(self, grid: Grid, out):
        self.grid, self.out = grid, out

    def step(self, trial: str, text: str) -> None:
        print(f"[{self.grid.elapsed():6.0f}s] {trial}: {text}", file=self.out, flush=True)

    def ended(self, trial: str, text: str) -> None:
        self.step(trial, text)
        self.step("grid", self.grid.summary())

    def close(self) -> None:
        pass


class Live:
    """A live view redrawn in place (rich): the grid's summary and a row per running trial; the
    lines of trials that end are printed above it, and the training logs only in the view."""

    def __init__(self, grid: Grid, out):
        from rich.console import Console
        from rich.live import Live as RichLive

        self.grid = grid
        self.console = Console(file=out, force_terminal=True)
        # What else the driver prints while the view is up goes above it (rich's redirection).
        self.live = RichLive(self, console=self.console, refresh_per_second=2, transient=False)
        self.live.start()

    def __rich__(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        # Text, not markup: a console.print(markup=False) above the view renders it with that setting.
        table = Table.grid(padding=(0, 1))
        table.add_row(Text.assemble(("grid", "bold"), " ", self.grid.summary()))
        running = Table(box=None, show_header=False, padding=(0, 1))
        for trial, (stage, step, total) in sorted(self.grid.where.items()):
            running.add_row(Text(trial), Text(stage), ProgressBar(total=max(total, 1), completed=step, width=24), Text(f"{step}/{total}"))
        for trial in sorted(t for t, s in self.grid.state.items() if s == "running" and t not in self.grid.where):
            running.add_row(Text(trial), Text("(not training)"), Text(""), Text(""))
        table.add_row(running)
        return table

    def step(self, trial: str, text: str) -> None:
        pass  # the view shows the step

    def ended(self, trial: str, text: str) -> None:
        self.live.console.print(f"[{self.grid.elapsed():6.0f}s] {trial}: {text}", markup=False, highlight=False)

    def close(self) -> None:
        self.live.stop()


def view(grid: Grid, out):
    """The live view on a terminal, plain lines elsewhere."""
    isatty = getattr(out, "isatty", None)
    return Live(grid, out) if isatty and isatty() else Lines(grid, out)
