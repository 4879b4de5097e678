"""Models, devices, checkpoints and the predictor shared by evaluation, the pyfunc and serving.

A checkpoint is a plain dict {"config": ModelConfig as dict, "state_dict": tensors}, loaded
with `torch.load(weights_only=True)`: no pickled code, rebuildable anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.preprocess import PREPROCESSOR_FILE, Preprocessor
from pipeline.validate import Schema

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings; saved in the checkpoint so the model can be rebuilt anywhere."""

    n_features: int
    num_classes: int
    hidden: int  # units of the dense layer (params.yaml train.hidden)
    dropout: float  # before the output layer (params.yaml train.dropout)
    image_side: int | None = None  # set: a CNN over (1, side, side) images; None: an MLP
    conv_filters: int = 32  # one 3x3 layer, as in the seed's reference CNN

    @property
    def kind(self) -> str:
        return "cnn" if self.image_side else "mlp"

    @classmethod
    def for_schema(cls, schema: Schema, hidden: int, dropout: float) -> ModelConfig:
        return cls(
            schema.n_features, schema.num_classes, hidden, dropout, image_side=schema.image_side
        )


class ConvNet(nn.Module):
    """Conv 3x3 (32) + ReLU -> MaxPool 2x2 -> Flatten -> Dense (64) + ReLU -> Dropout -> Dense."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        side = cfg.image_side
        assert side is not None
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, cfg.conv_filters, kernel_size=3, padding=1),  # (B, 32, S, S)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, S/2, S/2)
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(cfg.conv_filters * (side // 2) ** 2, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),  # logits; softmax at prediction time
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # (B, S*S) -> (B, 1, S, S)
            x = x.view(-1, 1, self.side, self.side)
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_features, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def build_model(cfg: ModelConfig) -> nn.Module:
    return ConvNet(cfg) if cfg.kind == "cnn" else MLP(cfg)


def choose_device(preference: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then the CPU; an explicit preference wins."""
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def save_checkpoint(model: nn.Module, cfg: ModelConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save({"config": asdict(cfg), "state_dict": state}, path)


def read_checkpoint(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a checkpoint: for rebuilding, or for a warm start."""
    blob = torch.load(path, map_location=device, weights_only=True)
    return ModelConfig(**blob["config"]), blob["state_dict"]


def load_checkpoint(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, ModelConfig]:
    cfg, state = read_checkpoint(path, device)
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


class Predictor:
    """Raw feature rows -> class probabilities, applying the training-time preprocessor."""

    def __init__(
        self,
        model: nn.Module,
        cfg: ModelConfig,
        preprocessor: Preprocessor,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.preprocessor = preprocessor
        self.device = torch.device(device)

    @classmethod
    def from_dir(cls, path: Path, device: torch.device | str = "cpu") -> Predictor:
        """Load `checkpoint.pt` + `preprocessor.json` from a model directory."""
        path = Path(path)
        for name in (CHECKPOINT, PREPROCESSOR_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: model directory lacks {name}")
        model, cfg = load_checkpoint(path / CHECKPOINT, device)
        return cls(model, cfg, Preprocessor.load(path / PREPROCESSOR_FILE), device)

    def save(self, path: Path) -> None:
        save_checkpoint(self.model, self.cfg, Path(path) / CHECKPOINT)
        self.preprocessor.save(Path(path) / PREPROCESSOR_FILE)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.preprocessor.schema.feature_names

    @torch.inference_mode()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, F) raw features -> (n, classes) float32 probabilities."""
        x = torch.from_numpy(self.preprocessor.transform(features)).to(self.device)
        return torch.softmax(self.model(x).float(), dim=1).cpu().numpy()

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.predict_proba(features).argmax(axis=1)
