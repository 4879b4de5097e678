"""Quality benchmark: the project's default model against plain references, same split.

For each data set and seed, on the project's own seeded split (train / val / test):

- **default**: what `mlops train` does with params.yaml's defaults (no tuning): the fitted
  preprocessor, `pipeline.train.train_model`, evaluated on the raw test rows through the
  Predictor the server uses;
- **tuned** (`--trials K`): the same after K Optuna trials of the params.yaml search space;
- **reference CNN**: the seed's example written plainly in PyTorch (Conv 32 3x3 + ReLU,
  MaxPool 2x2, Flatten, Dense 64 + ReLU, Dense softmax; Adam 1e-3, batch 32, pixels scaled
  to [0, 1]) for the same number of epochs as the default's budget, trained on train;
- **logreg**: scikit-learn's LogisticRegression on standardised features.

Data sets, none downloaded: `digits8` (all 1,797 bundled 8x8 digits), `pool` (the demo's
35% bootstrap pool of them, 628 images: small data, what `mlops run` starts from),
`digits28` (the same digits resampled to 28x28 on a 0-255 scale, twice each with random
shifts, stroke thickness and background noise: the CNN path at the MNIST image size) and
`mnist` when `mlops ingest --source mnist` has cached the real files (a seeded subset,
`--mnist-rows`).

Prints accuracy and macro F1 (mean, standard deviation and range over the seeds), training
seconds per epoch, and the default's margin over each reference and its time ratio to the
reference CNN, all measured in the same run. "Beats" means a mean margin larger than the
larger of the two arms' seed-to-seed standard deviations.

    python bench/quality.py [--seeds 3] [--trials 0] [--data digits8,digits28] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- data sets ----------------------------------------------------------------------------------


def digits8() -> pd.DataFrame:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"pixel{i}" for i in range(64)])
    frame.insert(0, "label", bunch.target)
    return frame


def digits28(seed: int = 0, copies: int = 2) -> pd.DataFrame:
    """The 8x8 digits drawn at 28x28 (0-255): upsampled to 20x20, thickened or thinned at
    random, placed with a random shift of up to 3 pixels, over faint background noise."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)[:, 0].numpy()
    images, labels = [], []
    for _ in range(copies):
        for image, label in zip(big, bunch.target, strict=True):
            gamma = rng.uniform(0.6, 1.6)  # stroke thickness: <1 thicker, >1 thinner
            ink = np.clip(image, 0, 1) ** gamma
            canvas = np.zeros((28, 28), dtype=np.float32)
            dy, dx = rng.integers(-3, 4, size=2)
            canvas[4 + dy : 24 + dy, 4 + dx : 24 + dx] = ink
            canvas = np.clip(canvas * 255 + rng.normal(0, 8, canvas.shape), 0, 255)
            images.append(canvas.round())
            labels.append(label)
    frame = pd.DataFrame(
        np.stack(images).reshape(len(images), -1), columns=[f"pixel{i}" for i in range(784)]
    )
    frame.insert(0, "label", labels)
    return frame


def mnist(rows: int) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(train pool, official test split) from the project's MNIST cache, or None."""
    from pipeline.config import Settings
    from pipeline.mnist import FILES, load_mnist

    cache = Settings().downloads_dir / "mnist"
    if not all((cache / name).exists() for name in FILES):
        return None  # never downloads: a bench measures what is here
    train, test = load_mnist(cache)
    train = train.sample(n=min(rows, len(train)), random_state=0).reset_index(drop=True)
    test = test.sample(n=min(rows // 4, len(test)), random_state=0).reset_index(drop=True)
    return train, test


# --- the arms -----------------------------------------------------------------------------------


@dataclass
class Score:
    accuracy: float
    macro_f1: float
    seconds: float
    epochs: int

    @property
    def per_epoch(self) -> float:
        return self.seconds / max(self.epochs, 1)


def _score(y: np.ndarray, pred: np.ndarray, seconds: float, epochs: int) -> Score:
    from sklearn.metrics import f1_score

    return Score(
        float((pred == y).mean()), float(f1_score(y, pred, average="macro")), seconds, epochs
    )


def _split_data(parts: dict[str, pd.DataFrame], params):
    from pipeline.preprocess import Preprocessor, features_labels
    from pipeline.train import SplitData
    from pipeline.validate import LABEL, Schema

    schema = Schema(tuple(c for c in parts["train"].columns if c != LABEL), params.data.num_classes)
    pre = Preprocessor.fit(
        features_labels(parts["train"], schema)[0], schema, params.preprocess.scaling
    )
    return SplitData.from_frames(parts, pre)


def run_default(parts, params, trials: int = 0) -> Score:
    from pipeline.model import Predictor
    from pipeline.preprocess import features_labels
    from pipeline.train import TrainParams, train_model
    from pipeline.tune import tune

    data = _split_data(parts, params)
    base = TrainParams.from_params(params)
    start = time.perf_counter()
    if trials:
        best = tune(
            data, base, params.tune.space, trials, params.tune.timeout_s, log_trials=False
        ).best_params
        base = TrainParams.from_params(params, **best)
    result = train_model(data, base, "cpu", show_progress=False)
    # The training loop's own time (as the reference's), plus the search when tuned.
    seconds = time.perf_counter() - start if trials else result.seconds
    raw, y = features_labels(parts["test"], data.preprocessor.schema)
    pred = Predictor(result.model, result.cfg, data.preprocessor).predict(raw)
    return _score(y, pred, seconds, len(result.history))


def run_reference(parts, epochs: int, seed: int) -> Score:
    """The seed's Keras example, plainly: no validation, no schedule, no augmentation."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x = {k: v.drop(columns="label").to_numpy(np.float32) for k, v in parts.items()}
    y = {k: v["label"].to_numpy(np.int64) for k, v in parts.items()}
    top = float(x["train"].max()) or 1.0
    side = int(round(x["train"].shape[1] ** 0.5))
    tensor = {k: torch.from_numpy(v / top).view(-1, 1, side, side) for k, v in x.items()}
    flat = 32 * ((side - 2) // 2) ** 2
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_y = torch.from_numpy(y["train"])
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=gen)
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            loss = nn.functional.cross_entropy(model(tensor["train"][idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        pred = model.eval()(tensor["test"]).argmax(1).numpy()
    return _score(y["test"], pred, seconds, epochs)


def run_logreg(parts) -> Score:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = {k: v.drop(columns="label").to_numpy(np.float32) for k, v in parts.items()}
    y = {k: v["label"].to_numpy(np.int64) for k, v in parts.items()}
    start = time.perf_counter()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    model.fit(x["train"], y["train"])
    seconds = time.perf_counter() - start
    return _score(y["test"], model.predict(x["test"]), seconds, 1)


# --- the bench ----------------------------------------------------------------------------------


@dataclass
class Arm:
    scores: list[Score] = field(default_factory=list)

    def mean(self, key: str) -> float:
        return float(np.mean([getattr(s, key) for s in self.scores]))

    def spread(self, key: str) -> float:
        """The seed-to-seed spread: the sample standard deviation over the seeds."""
        values = [getattr(s, key) for s in self.scores]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def range(self, key: str) -> tuple[float, float]:
        values = [getattr(s, key) for s in self.scores]
        return min(values), max(values)


def splits_for(name: str, seed: int, params, mnist_rows: int) -> dict[str, pd.DataFrame] | None:
    from pipeline.preprocess import _train_val, split_frame

    split = params.split
    if name == "mnist":
        pair = mnist(mnist_rows)
        if pair is None:
            return None
        parts = _train_val(pair[0], split.val_size / (1 - split.test_size), seed)
        parts["test"] = pair[1]
        return parts
    if name == "pool":  # the demo's bootstrap pool: what `mlops run` trains on in round 1
        from pipeline.ingest import load_digits_frame

        frame = load_digits_frame("bootstrap", params.data.bootstrap_fraction, 42)
        return split_frame(frame, split.val_size, split.test_size, seed)
    frame = {"digits8": digits8, "digits28": digits28}[name]()
    return split_frame(frame, split.val_size, split.test_size, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=0, help="also a tuned arm (K trials)")
    parser.add_argument("--data", default="digits8,pool,digits28,mnist")
    parser.add_argument("--mnist-rows", type=int, default=12000)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    import torch

    from pipeline.config import Params

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    results: dict[str, dict[str, Arm]] = {}
    for name in args.data.split(","):
        arms: dict[str, Arm] = {}
        for seed in range(args.seeds):
            params = Params().updated(seed=seed)
            parts = splits_for(name, seed, params, args.mnist_rows)
            if parts is None:
                print(f"{name}: not cached here (run `mlops ingest --source mnist`); skipped")
                break
            rows = {k: len(v) for k, v in parts.items()}
            print(f"{name} seed {seed}: {rows}", flush=True)
            todo = {
                "default": partial(run_default, parts, params),
                "reference CNN": partial(run_reference, parts, params.train.epochs, seed),
                "logreg": partial(run_logreg, parts),
            }
            if args.trials:
                todo["tuned"] = partial(run_default, parts, params, args.trials)
            for arm, fn in todo.items():
                score = fn()
                arms.setdefault(arm, Arm()).scores.append(score)
                print(
                    f"  {arm:14s} acc {score.accuracy:.4f}  F1 {score.macro_f1:.4f}  "
                    f"{score.seconds:6.1f} s ({score.epochs} epochs)",
                    flush=True,
                )
        if arms:
            results[name] = arms
    _report(results, args.json)


def _report(results: dict[str, dict[str, Arm]], out: Path | None) -> None:
    print()
    print("| data | arm | accuracy: mean ± sd (min-max) | macro F1 | s/epoch | epochs |")
    print("| --- | --- | --- | --- | --- | --- |")
    summary = {}
    for name, arms in results.items():
        for arm, a in arms.items():
            low, high = a.range("accuracy")
            print(
                f"| {name} | {arm} | {a.mean('accuracy'):.4f} ± {a.spread('accuracy'):.4f} "
                f"({low:.4f}-{high:.4f}) | {a.mean('macro_f1'):.4f} | "
                f"{a.mean('per_epoch'):.3f} | {a.mean('epochs'):.1f} |"
            )
        default = arms["default"]
        summary[name] = {
            arm: {
                "accuracy": a.mean("accuracy"),
                "accuracy_spread": a.spread("accuracy"),
                "macro_f1": a.mean("macro_f1"),
                "seconds_per_epoch": a.mean("per_epoch"),
                "seconds": a.mean("seconds"),
            }
            for arm, a in arms.items()
        }
        for ref in ("reference CNN", "logreg"):
            r = arms[ref]
            margin = default.mean("accuracy") - r.mean("accuracy")
            spread = max(default.spread("accuracy"), r.spread("accuracy"))
            verdict = "beats" if margin > spread else "does NOT beat"
            print(
                f"{name}: default - {ref} = {margin:+.4f} accuracy "
                f"(seed spread {spread:.4f}): {verdict}"
            )
        ratio = default.mean("per_epoch") / arms["reference CNN"].mean("per_epoch")
        print(f"{name}: default / reference CNN seconds per epoch = {ratio:.2f}x")
        if "tuned" in arms:
            gain = arms["tuned"].mean("accuracy") - default.mean("accuracy")
            print(f"{name}: tuned - default = {gain:+.4f} accuracy")
    if out:
        out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
