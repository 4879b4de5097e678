"""Drift benchmark: the false-alarm rate on windows drawn from the training distribution,
by window size up to 10,000 rows, and how soon the shifted stream raises the alarm, with
the detector the monitor runs (pipeline/drift.py, params.yaml's monitor section) beside
the detector it replaced (a KS test per feature at p < 0.01, no correction, no effect
size, no persistence), in one run.

Reference: the demo's training rows (the bootstrap pool's training split). Windows from the
training distribution: (a) resamples of the reference itself (the null exactly), (b)
resamples of the held-out production stream (the same population, other rows). Shifted:
the stream with `--drift`'s distortion. A window "drifts" when the share of drifted
features reaches `monitor.drift_threshold`; an alarm needs `monitor.persistence` drifted
windows in a row. The alarm rate is the share of windows (over `--windows` per size) at
which an alarm stands; the target is at most `monitor.false_alarm_rate`.

    python bench/drift.py [--windows 60] [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _old_detector(reference: np.ndarray, current: np.ndarray) -> float:
    """The share of features the former detector flagged (KS p < 0.01 each)."""
    from scipy.stats import ks_2samp

    varying = np.flatnonzero(reference.std(axis=0) > 0)
    drifted = sum(ks_2samp(reference[:, j], current[:, j]).pvalue < 0.01 for j in varying)
    return drifted / len(varying)


def _alarm_rate(flags: list[bool], persistence: int) -> float:
    """The share of windows at which `persistence` drifted windows in a row end."""
    run, alarms = 0, 0
    for flag in flags:
        run = run + 1 if flag else 0
        alarms += run >= persistence
    return alarms / len(flags)


def _first_alarm(flags: list[bool], persistence: int) -> int | None:
    run = 0
    for k, flag in enumerate(flags, start=1):
        run = run + 1 if flag else 0
        if run >= persistence:
            return k
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--sizes", default="100,1000,10000")
    args = parser.parse_args()

    from pipeline.config import load_params
    from pipeline.drift import detect_drift
    from pipeline.ingest import load_digits_frame
    from pipeline.preprocess import split_frame
    from pipeline.stream import distort
    from pipeline.validate import LABEL, Schema

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    cfg = params.monitor
    pool = load_digits_frame("bootstrap", params.data.bootstrap_fraction, params.seed)
    stream = load_digits_frame("stream", params.data.bootstrap_fraction, params.seed)
    train = split_frame(pool, params.split.val_size, params.split.test_size, params.seed)["train"]
    names = [c for c in train.columns if c != LABEL]
    schema = Schema(tuple(names), params.data.num_classes)
    reference = train[names].to_numpy(np.float32)
    held_out = stream[names].to_numpy(np.float32)
    shifted = distort(held_out, schema)
    probs = np.full((1, 10), 0.1, np.float32)  # the class and confidence parts are not judged

    def judge(current: np.ndarray, ref: np.ndarray | None = None) -> tuple:
        """(drifted now, drifted before, share of features flagged now, before)."""
        ref = reference if ref is None else ref
        p = np.repeat(probs, len(current), axis=0)
        report = detect_drift(
            ref, current, names, np.repeat(probs, len(ref), axis=0), p,
            cfg.drift_threshold, cfg.false_alarm_rate, cfg.min_effect,
        )  # fmt: skip
        old = _old_detector(ref, current)
        return report.drifted, old >= cfg.drift_threshold, report.score, old

    rng = np.random.default_rng(0)
    print(
        f"reference: {len(reference)} training rows; persistence {cfg.persistence}, "
        f"false-alarm rate {cfg.false_alarm_rate}, min effect {cfg.min_effect}, "
        f"threshold {cfg.drift_threshold}\n"
    )
    print(
        "| windows from | rows | windows | alarms (now) | drifted (now) | features flagged "
        "(now, mean / max) | drifted (before) | features flagged (before, mean / max) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    start = time.perf_counter()
    # (c) a large continuous table with a difference too small to matter (0.05 standard
    # deviations on every feature): with 10,000 rows a p-value alone calls it drift
    synth_ref = rng.normal(size=(20_000, 64)).astype(np.float32)
    sources = [
        ("training rows", reference, reference),
        ("held-out stream", held_out, reference),
        ("continuous, +0.05 sd", None, synth_ref),
    ]
    for label, source, ref in sources:
        for size in (int(s) for s in args.sizes.split(",")):
            if source is None:
                draw = lambda n: (rng.normal(size=(n, 64)) + 0.05).astype(np.float32)  # noqa: E731
            else:
                draw = lambda n, src=source: src[rng.integers(0, len(src), n)]  # noqa: E731
            new, old, share_new, share_old = [], [], [], []
            for _ in range(args.windows):
                now, before, s_now, s_old = judge(draw(size), ref)
                new.append(now)
                old.append(before)
                share_new.append(s_now)
                share_old.append(s_old)
            print(
                f"| {label} | {size:,} | {args.windows} "
                f"| {_alarm_rate(new, cfg.persistence):.3f} | {np.mean(new):.3f} "
                f"| {np.mean(share_new):.3f} / {np.max(share_new):.3f} | {np.mean(old):.3f} "
                f"| {np.mean(share_old):.3f} / {np.max(share_old):.3f} |"
            )
    print("\nshifted stream (images moved a quarter of their side), windows in order:\n")
    print("| rows a window | first alarm (now: window #) | drifted windows (now) "
          "| first flag (before) |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    for size in (50, 200, 1000):
        new, old = [], []
        for _ in range(10):
            now, before, _, _ = judge(shifted[rng.integers(0, len(shifted), size)])
            new.append(now)
            old.append(before)
        first_old = next((k for k, f in enumerate(old, start=1) if f), None)
        print(
            f"| {size:,} | {_first_alarm(new, cfg.persistence)} | {np.mean(new):.2f} "
            f"| {first_old} |"
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
