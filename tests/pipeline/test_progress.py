"""Progress a person can follow: the events a real tuning + training run reports, and the
live rows `mlops run` draws from them."""

from __future__ import annotations

import io
from dataclasses import replace

from rich.console import Console

from mlops.live import RunDisplay
from pipeline import progress
from pipeline.experiment import fit
from pipeline.train import SplitData, TrainParams, train_model


def test_tuning_and_training_report_trials_and_epochs(prepared, settings, params):
    events: list[progress.Event] = []
    with progress.listening(events.append):
        fit(settings, params, trials=2, epochs=3, show_progress=False, register_model=False)
    kinds = [(e.kind, e.fields.get("number", e.fields.get("epoch"))) for e in events]
    trial_1 = [("trial_start", 0), ("epoch", 1), ("epoch", 2), ("epoch", 3), ("trial_end", 0)]
    assert kinds[:5] == trial_1, kinds
    assert kinds.count(("trial_start", 1)) == 1 and kinds.count(("trial_end", 1)) == 1
    phase = kinds.index(("phase", None))
    assert kinds[phase + 1 :] == [("epoch", 1), ("epoch", 2), ("epoch", 3)]
    last = events[-1].fields
    assert last["epochs"] == 3 and 0.0 <= last["val_accuracy"] <= 1.0

    # the same events drawn: what a terminal shows after each one
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    display = RunDisplay(console, rounds=2)
    display.on_event(progress.Event("round", {"round": 1, "rounds": 2}))
    display.on_event(progress.Event("step_start", {"name": "train round 1 (2 tuning trials)"}))
    frames = []
    for event in events:
        display.on_event(event)
        frame = io.StringIO()
        Console(file=frame, width=140, color_system=None).print(display.rows.get_renderable())
        frames.append(frame.getvalue())
    assert "round 1 of 2" in out.getvalue()
    assert any("tuning trial 2" in f and "1/2" in f and "best val accuracy 0." in f for f in frames)
    assert any("trial 2: epoch" in f and "2/3" in f for f in frames)
    assert "final model: epoch" in frames[-1] and "3/3" in frames[-1]
    assert "train round 1 (2 tuning trials)" in frames[-1]
    assert "tuning trial 2" not in frames[-1]  # the search is over: its row is gone
    assert "/?" not in frames[-1]  # a step has no count

    display.on_event(
        progress.Event(
            "step_end", {"name": "train round 1 (2 tuning trials)", "seconds": 2.5, "ok": True}
        )
    )
    assert "done  train round 1 (2 tuning trials)  2.5 s" in out.getvalue()


def test_a_broken_listener_never_breaks_training(prepared, settings, params):
    def broken(event: progress.Event) -> None:
        raise RuntimeError("display crashed")

    data = SplitData.load(settings.processed_dir)
    tp = replace(TrainParams.from_params(params), epochs=2)
    with progress.listening(broken):
        result = train_model(data, tp, "cpu", show_progress=False)
    assert len(result.history) == 2
    assert progress._listeners == []  # removed when the block ends
