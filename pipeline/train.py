"""Training: one loop for the CPU, a GPU, and `torchrun` DistributedDataParallel.

A pure loop like nanoGPT's: torch and the project's model and data, no MLflow. Tracking
plugs in through the `on_epoch` callback (pipeline/tracking.py), and `torchrun` starts
pipeline/ddp.py, which calls this same function on every rank. Under DDP every rank
trains on its DistributedSampler shard and evaluates the full validation set, so all ranks
take the same early-stopping decision.

The training split is either in memory (a seeded permutation of one tensor) or, when
`train.from_shards` resolves to on, read from its Parquet row groups a chunk at a time
(pipeline/shards.py); validation and test are in memory either way (they are small).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from pipeline import progress
from pipeline.config import Params
from pipeline.model import ModelConfig, build_model, unwrap
from pipeline.preprocess import (
    SPLITS,
    Preprocessor,
    augment_batch,
    features_labels,
    load_preprocessor,
    load_split,
    split_path,
)
from pipeline.shards import ShardDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainParams:
    """What one training run needs, flat: params.yaml's `train:` and `preprocess:` sections
    and the seed. No defaults here: they live once, in pipeline/config.py."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    dropout: float
    hidden: int
    patience: int
    augment: bool
    max_shift: int
    noise_std: float
    schedule: str
    shuffle_buffer: int
    seed: int

    @classmethod
    def from_params(cls, params: Params, **overrides) -> TrainParams:
        """From params.yaml; overrides that are None are ignored (unset CLI options)."""
        merged = {
            **params.preprocess.model_dump(),
            **params.train.model_dump(),
            "seed": params.seed,
        }
        merged.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in merged.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SplitData:
    """Standardised float32 features and int64 labels of each split, plus the preprocessor.
    With `train_shards` set, the training split is not in `x`/`y`: training reads it from
    that Parquet file or directory (pipeline/shards.py)."""

    preprocessor: Preprocessor
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    train_shards: Path | None = None

    @classmethod
    def from_frames(cls, frames: dict[str, pd.DataFrame], preprocessor: Preprocessor) -> SplitData:
        schema = preprocessor.schema
        x, y = {}, {}
        for name, frame in frames.items():
            raw, y[name] = features_labels(frame, schema)
            x[name] = preprocessor.transform(raw)
        return cls(preprocessor, x, y)

    @classmethod
    def load(cls, processed_dir: Path, from_shards: bool = False) -> SplitData:
        """Every split in memory, or (`from_shards`) validation and test only."""
        pre = load_preprocessor(processed_dir)
        names = [s for s in SPLITS if not (from_shards and s == "train")]
        data = cls.from_frames({s: load_split(processed_dir, s) for s in names}, pre)
        if from_shards:
            data.train_shards = split_path(processed_dir, "train")
        return data

    @property
    def train_from(self) -> str:
        """How training reads its split: "shards" or "memory" (tagged on the run)."""
        return "shards" if self.train_shards is not None else "memory"


@dataclass
class TrainResult:
    model: nn.Module
    cfg: ModelConfig
    params: TrainParams
    device: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_val_accuracy: float = 0.0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    warm_started: bool = False


EpochCallback = Callable[[int, dict[str, float]], None]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def train_model(
    data: SplitData,
    params: TrainParams,
    device: torch.device | str = "cpu",
    init_state: dict | None = None,
    on_epoch: EpochCallback | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train with AdamW, the learning rate schedule of `params.schedule`, and early
    stopping on validation accuracy: the weights of the epoch with the best validation
    accuracy (the lower validation loss breaks a tie) are restored, and training stops after
    `params.patience` epochs without a better one. (Stopping on the loss alone kept epoch-2
    weights on 28x28 data while the accuracy still rose from 0.83 to 0.95.)

    `init_state` warm-starts from another model's weights (same architecture).
    `on_epoch(epoch, metrics)` is called after every epoch (metric logging, Optuna pruning).

    Training owns its random streams, so on the CPU the weights depend on the data and
    `params` alone, not on what is displayed or logged around it: the sampler, the loader
    and the augmentation have generators of their own, seeded from `params.seed`; dropout
    and initialisation draw from torch's global generator, which is seeded here, saved and
    restored around `on_epoch` (a callback may draw from it), and handed back to the caller
    as it was. (A progress bar that opened a second DataLoader iterator used to draw the
    loader's base seed from the global generator and so change every dropout mask.)
    """
    device = torch.device(device)
    with _own_rng(device):
        torch.manual_seed(params.seed)
        return _train(data, params, device, init_state, on_epoch, show_progress)


def _train(
    data: SplitData,
    params: TrainParams,
    device: torch.device,
    init_state: dict | None,
    on_epoch: EpochCallback | None,
    show_progress: bool,
) -> TrainResult:
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = ModelConfig.for_schema(data.preprocessor.schema, params.hidden, params.dropout)
    model = build_model(cfg)
    warm = False
    if init_state is not None:
        model.load_state_dict(init_state)
        warm = True
    model = model.to(device)
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(  # fused: one kernel per step instead of one per tensor
        model.parameters(),
        lr=params.lr,
        weight_decay=params.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    batches = _TrainBatches(data, params)
    sched = _schedule(opt, params.schedule, params.epochs * batches.per_epoch)
    val_x = torch.from_numpy(data.x["val"]).to(device)
    val_y = torch.from_numpy(data.y["val"]).to(device)
    aug_gen = torch.Generator().manual_seed(params.seed + 1)
    use_bf16 = device.type == "cuda"

    result = TrainResult(model, cfg, params, str(device), warm_started=warm)
    best_state, bad_epochs, seen, start = None, 0, 0, time.perf_counter()
    for epoch in range(1, params.epochs + 1):
        model.train()
        total, count = 0.0, 0
        epoch_batches = batches.epoch(epoch)
        if show_progress and rank() == 0:
            epoch_batches = _progress(epoch_batches, batches.per_epoch, epoch, params.epochs)
        for xb, yb in epoch_batches:
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            if params.augment:
                xb = _augment(xb, cfg, params, aug_gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        seen += count
        val_loss, val_acc = _evaluate(unwrap(model), val_x, val_y, use_bf16)
        metrics = {
            "train_loss": total / max(count, 1),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": opt.param_groups[0]["lr"],
        }
        result.history.append({"epoch": epoch, **metrics})
        if rank() == 0:
            progress.report("epoch", epoch=epoch, epochs=params.epochs, **metrics)
        if _better(val_acc, val_loss, result):
            result.best_val_accuracy, result.best_val_loss = val_acc, val_loss
            result.best_epoch, bad_epochs = epoch, 0
            best_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        else:
            bad_epochs += 1
        if on_epoch is not None:
            with _own_rng(device):
                on_epoch(epoch, metrics)
        if bad_epochs >= params.patience:
            log.info("early stop at epoch %d (best %d)", epoch, result.best_epoch)
            break
    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    result.model = unwrap(model).eval()
    result.seconds = time.perf_counter() - start
    result.samples_per_s = seen / result.seconds if result.seconds else 0.0
    return result


def _own_rng(device: torch.device):
    """Torch's global generator (and the GPU's), restored when the block ends."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device], device_type="cuda")
    return torch.random.fork_rng(devices=[], device_type="cpu")


def _better(val_acc: float, val_loss: float, best: TrainResult) -> bool:
    """A better epoch: higher validation accuracy, or the same with a lower loss."""
    if best.best_epoch == 0:
        return True
    if val_acc > best.best_val_accuracy + 1e-9:
        return True
    return abs(val_acc - best.best_val_accuracy) <= 1e-9 and val_loss < best.best_val_loss - 1e-6


def _schedule(opt: torch.optim.Optimizer, kind: str, steps: int):
    """Per-step learning-rate factor: cosine from 1 to ~0 over the whole budget, or 1."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r}: cosine or constant")
    total = max(steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )


class _TrainBatches:
    """The training split's mini-batches epoch by epoch, as (x, y) CPU tensors: indexed
    from the in-memory split, or read from its shards (this rank's share; every rank gets
    the same number of batches either way). The shards are read in this process: a chunk
    is decoded far faster than a step trains on it (docs/benchmarks.md), and no worker
    process is started per epoch."""

    def __init__(self, data: SplitData, params: TrainParams) -> None:
        self.params = params
        self.shards: ShardDataset | None = None
        if data.train_shards is not None:
            world = dist.get_world_size() if is_distributed() else 1
            self.shards = ShardDataset(
                data.train_shards,
                data.preprocessor,
                params.batch_size,
                params.shuffle_buffer,
                params.seed,
                rank=rank(),
                world_size=world,
            )
            self.per_epoch = self.shards.batches_per_epoch()
        else:
            self.x = torch.from_numpy(data.x["train"])
            self.y = torch.from_numpy(data.y["train"])
            self.order_gen = torch.Generator().manual_seed(params.seed)
            self.per_epoch = math.ceil(_local_rows(len(self.y)) / params.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shards is not None:
            self.shards.set_epoch(epoch)
            return iter(self.shards)
        batches = _batches(len(self.y), self.params, epoch, self.order_gen)
        return ((self.x[idx], self.y[idx]) for idx in batches)


def _local_rows(n: int) -> int:
    """Rows this rank trains on per epoch (DistributedSampler pads to equal shards)."""
    return math.ceil(n / dist.get_world_size()) if is_distributed() else n


def _batches(n: int, params: TrainParams, epoch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """This epoch's mini-batches as index tensors into the in-memory training split: a
    seeded permutation, or this rank's DistributedSampler shard under DDP. (Indexing the
    tensors directly is several times faster than a DataLoader's per-row collation on
    data this size.)"""
    if is_distributed():
        sampler = DistributedSampler(range(n), shuffle=True, seed=params.seed)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
    else:
        order = torch.randperm(n, generator=gen)
    return list(order.split(params.batch_size))


def _augment(xb: torch.Tensor, cfg: ModelConfig, params: TrainParams, gen: torch.Generator):
    if cfg.image_side:
        side = cfg.image_side
        images = augment_batch(xb.view(-1, 1, side, side), params.max_shift, params.noise_std, gen)
        return images.view(xb.shape)
    return augment_batch(xb, 0, params.noise_std, gen)


@torch.inference_mode()
def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool
) -> tuple[float, float]:
    model.eval()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x).float()
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def _progress(batches: Iterable, total: int, epoch: int, epochs: int):
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch")
