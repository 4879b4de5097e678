"""The live display of `mlops run`: the round, the running step with its time, and during
training the tuning trials and the epochs, drawn from pipeline.progress events.

Finished steps stay on screen as one line each (`done  version data (dvc add + push)  0.3 s`),
in place of Prefect's nameless "Finished in state Completed()". On a console that is not a
terminal (a pipe, CI) only those lines are printed: rich draws no live rows there.
"""

from __future__ import annotations

import logging
import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from pipeline import progress


class _Count(MofNCompleteColumn):
    """`3/20` for counted rows; nothing for a step (it has no total)."""

    def render(self, task):
        return super().render(task) if task.total is not None else Text("")


STARTING = "starting Prefect's API (its temporary local server takes a few seconds)"


class RunDisplay:
    """Listens to pipeline.progress while the loop runs; `with RunDisplay(console, rounds):`."""

    def __init__(self, console: Console, rounds: int) -> None:
        self.console = console
        self.rows = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            _Count(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._lock = threading.Lock()
        self.loop = self.rows.add_task("round", total=rounds, info="", start=False)
        self.step = self.rows.add_task(STARTING, total=None, info="")
        self.trials = self.rows.add_task("tuning trial", total=1, info="", visible=False)
        self.epochs = self.rows.add_task("epoch", total=1, info="", visible=False)
        self._best: float | None = None

    def __enter__(self) -> RunDisplay:
        if not self.console.is_terminal:  # no live rows there: say what the wait is
            self.console.print(STARTING)
        self.rows.start()
        self._listening = progress.listening(self.on_event)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._listening.__exit__(*exc)
        self.rows.stop()

    def on_event(self, event: progress.Event) -> None:
        with self._lock:
            getattr(self, f"_{event.kind}", lambda f: None)(event.fields)

    # --- one method per event kind -----------------------------------------------------------

    def _round(self, f: dict) -> None:
        self.rows.start_task(self.loop)
        self.rows.update(self.loop, completed=f["round"] - 1, description=f"round {f['round']}")
        self.console.rule(f"round {f['round']} of {f['rounds']}", style="dim")

    def _step_start(self, f: dict) -> None:
        self.rows.reset(self.step, total=None, description=f["name"])
        self.rows.update(self.trials, visible=False)
        self.rows.update(self.epochs, visible=False)

    def _step_end(self, f: dict) -> None:
        mark = "[green]done[/]" if f["ok"] else "[red]failed[/]"
        self.console.print(f"  {mark}  {f['name']}  [dim]{f['seconds']:.1f} s[/]")
        self.rows.update(self.step, description="[dim]next step[/]")
        self.rows.update(self.trials, visible=False)
        self.rows.update(self.epochs, visible=False)
        if f["name"].startswith("stop API"):
            self.rows.update(self.loop, completed=self.rows.tasks[self.loop].total)

    def _trial_start(self, f: dict) -> None:
        if f["number"] == 0:
            self._best = None
            self.rows.reset(self.trials)  # its clock starts with the search
        self.rows.update(
            self.trials,
            total=f["trials"],
            completed=f["number"],
            description=f"tuning trial {f['number'] + 1}",
            info=self._best_info(),
            visible=True,
        )
        self.rows.reset(self.epochs, description=f"trial {f['number'] + 1}: epoch", visible=False)

    def _trial_end(self, f: dict) -> None:
        if not f["pruned"]:
            value = f["val_accuracy"]
            self._best = value if self._best is None else max(self._best, value)
        self.rows.update(self.trials, completed=f["number"] + 1, info=self._best_info())

    def _best_info(self) -> str:
        return "" if self._best is None else f"best val accuracy {self._best:.4f}"

    def _phase(self, f: dict) -> None:
        self.rows.update(self.trials, visible=False)
        self.rows.reset(self.epochs, total=f["epochs"], description=f"{f['name']}: epoch")
        self.rows.update(self.epochs, info="", visible=True)

    def _epoch(self, f: dict) -> None:
        self.rows.update(
            self.epochs,
            total=f["epochs"],
            completed=f["epoch"],
            info=f"val accuracy {f['val_accuracy']:.4f}, loss {f['val_loss']:.3f}",
            visible=True,
        )


class _StepLinesOnly(logging.Filter):
    """Drops Prefect's per-task "Finished in state Completed()" (the display prints each
    step's name and time instead) and its multi-line temporary-server notices."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name.startswith(("prefect.task_runs", "prefect.flow_runs")):
            return not message.startswith("Finished in state Completed")
        if record.name.startswith("prefect"):
            return not message.startswith(("Starting temporary server", "Stopping temporary"))
        return True


def quiet_prefect_steps() -> None:
    """Install _StepLinesOnly on the console handlers (until the command exits: the
    temporary server's notice comes at interpreter exit)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_StepLinesOnly())
