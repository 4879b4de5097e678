"""Labels benchmark: test accuracy after each round against labels spent, the label queue's
uncertainty (and margin) sampling against random sampling, same seeds, one run.

The demo's setting: the model starts from the bootstrap pool (35% of the bundled digits);
each round, the production stream's next rows arrive unlabelled, the strategy picks
`--budget` of them to label (pipeline/labelqueue.py, on the current model's probabilities,
as `mlops label-queue` does on the prediction log), they join the training data, and the
model is retrained (the project's default model and training, `pipeline.train`) and scored
on the fixed test split. Every arm sees the same rows in the same rounds with the same
seeds; only the choice of rows differs.

    python bench/labels.py [--seeds 3] [--rounds 4] [--budget 40] [--strategies uncertainty,random]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _train(frames: dict[str, pd.DataFrame], params, seed: int):
    import torch

    from pipeline.model import Predictor
    from pipeline.preprocess import Preprocessor, features_labels
    from pipeline.train import SplitData, TrainParams, train_model
    from pipeline.validate import LABEL, Schema

    torch.manual_seed(seed)
    schema = Schema(tuple(c for c in frames["train"].columns if c != LABEL), 10)
    pre = Preprocessor.fit(features_labels(frames["train"], schema)[0], schema, "auto")
    data = SplitData.from_frames(frames, pre)
    tp = TrainParams.from_params(params, seed=seed)
    result = train_model(data, tp, "cpu", show_progress=False)
    return Predictor(result.model, result.cfg, pre), schema


def run(strategy: str, seed: int, rounds: int, budget: int, params) -> list[tuple[int, float]]:
    """(labels spent, test accuracy) after round 0 (the pool alone) and each round."""
    from pipeline.ingest import load_digits_frame
    from pipeline.labelqueue import rank
    from pipeline.preprocess import features_labels, split_frame

    pool = load_digits_frame("bootstrap", params.data.bootstrap_fraction, params.seed)
    stream = load_digits_frame("stream", params.data.bootstrap_fraction, params.seed)
    frames = split_frame(pool, params.split.val_size, params.split.test_size, seed)
    per_round = len(stream) // rounds
    spent, out = 0, []
    predictor, schema = _train(frames, params, seed)
    x_test, y_test = features_labels(frames["test"], schema)
    out.append((0, float((predictor.predict(x_test) == y_test).mean())))
    for r in range(rounds):
        arrived = stream.iloc[r * per_round : (r + 1) * per_round]
        x, _ = features_labels(arrived, schema)
        probs = predictor.predict_proba(x)
        rows = [
            {"id": k, "probabilities": probs[k], "label": int(probs[k].argmax())}
            for k in range(len(arrived))
        ]
        picked = [row["id"] for row in rank(rows, strategy, budget, seed=seed * 100 + r)]
        frames["train"] = pd.concat([frames["train"], arrived.iloc[picked]], ignore_index=True)
        spent += len(picked)
        predictor, _ = _train(frames, params, seed)
        out.append((spent, float((predictor.predict(x_test) == y_test).mean())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--strategies", default="uncertainty,margin,random")
    args = parser.parse_args()
    import torch

    from pipeline.config import load_params

    torch.set_num_threads(max(1, torch.get_num_threads()))
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    strategies = args.strategies.split(",")
    results: dict[str, list[list[tuple[int, float]]]] = {s: [] for s in strategies}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for strategy in strategies:  # the arms take turns within a seed
            curve = run(strategy, seed, args.rounds, args.budget, params)
            results[strategy].append(curve)
            print(f"  seed {seed} {strategy:12} " + "  ".join(f"{a:.4f}" for _, a in curve))
    print(f"\n{args.seeds} seeds, {args.rounds} rounds, {args.budget} labels a round, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    header = "| labels spent | " + " | ".join(strategies) + " |"
    print("\ntest accuracy (mean over seeds, +- standard deviation)\n")
    print(header)
    print("|" + " --- |" * (len(strategies) + 1))
    for r in range(args.rounds + 1):
        spent = results[strategies[0]][0][r][0]
        cells = []
        for s in strategies:
            accs = np.array([curve[r][1] for curve in results[s]])
            cells.append(f"{accs.mean():.4f} +- {accs.std():.4f}")
        print(f"| {spent} | " + " | ".join(cells) + " |")
    if "random" in strategies:
        last = {s: np.mean([c[-1][1] for c in results[s]]) for s in strategies}
        for s in strategies:
            if s != "random":
                print(
                    f"\n{s} vs random after {args.rounds} rounds: {last[s] - last['random']:+.4f}"
                )


if __name__ == "__main__":
    main()
