"""Models, devices, checkpoints and the predictor shared by evaluation, the pyfunc and serving.

A checkpoint is a plain dict {"config": ModelConfig as dict, "state_dict": tensors}, loaded
with `torch.load(weights_only=True)`: no pickled code, rebuildable anywhere.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.performance import Calibration
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
    conv_filters: int = 32  # filters of the first 3x3 convolution, as in the seed's reference
    # Convolution blocks (each conv 3x3 + batch norm + ReLU + max-pool 2x2, the filters
    # doubling per block). A checkpoint without these keys predates them: one block, no norm.
    conv_blocks: int = 1
    batch_norm: bool = False

    @property
    def kind(self) -> str:
        return "cnn" if self.image_side else "mlp"

    @classmethod
    def for_schema(cls, schema: Schema, hidden: int, dropout: float) -> ModelConfig:
        """The default architecture for a schema. Images: two conv blocks of 16 and 32
        filters with batch norm (bench/quality.py: 0.98 on the 8x8 digits and 0.97 on its
        28x28 set, against 0.97 and 0.88 for the seed's one-block reference, at about the
        same time per epoch); one block when the image is too small to pool twice."""
        side = schema.image_side
        return cls(
            schema.n_features,
            schema.num_classes,
            hidden,
            dropout,
            image_side=side,
            conv_filters=16,
            conv_blocks=2 if side and side >= 4 else 1,
            batch_norm=True,
        )

    def describe(self, parameters: int | None = None) -> str:
        """What was built and why, in one line (printed by `mlops train`, logged on the run
        and written into the model version's description)."""
        if self.kind == "cnn":
            side = self.image_side
            filters = ", ".join(str(self.conv_filters * 2**i) for i in range(self.conv_blocks))
            text = (
                f"CNN: the {self.n_features} features are a {side}x{side} image "
                f"({self.n_features} = {side}^2); {self.conv_blocks} conv block(s) of "
                f"{filters} filters{' with batch norm' if self.batch_norm else ''}, "
                f"dense {self.hidden}, {self.num_classes} classes"
            )
        else:
            text = (
                f"MLP: {self.n_features} features are not a square image; 2 hidden layers of "
                f"{self.hidden}, {self.num_classes} classes"
            )
        return text if parameters is None else f"{text}; {parameters:,} parameters"


# Below this many elements torch's one kernel beats the pairs' four (measured on one
# thread: 3.9 against 6.1 us at 1,024 elements, even at 4-8k; 235 against 27 us at 65,536)
SMALL_POOL = 6144


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2), with a faster forward outside training: the larger of each pair
    of rows, then of each pair of columns, the same values bit for bit (a maximum rounds
    nothing). On one CPU thread torch's own 2x2 max-pool was 60% of the default ConvNet's
    forward pass at 256 rows (1.27 ms of the first pool against 0.09 ms for the pairs), and
    20x the pairs' time on 28x28 maps. Training keeps torch's kernel (its backward sends a
    tie's gradient to one input), and so do small maps, where one kernel call is cheaper."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # an odd last row or column: dropped
        if self.training or x.numel() < SMALL_POOL or not h or not w:
            return super().forward(x)  # (a map too small to pool: torch's own error)
        pairs = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])  # rows 2i and 2i+1
        return torch.maximum(pairs[..., 0::2], pairs[..., 1::2])  # then columns


class ConvNet(nn.Module):
    """[Conv 3x3 -> (BatchNorm) -> ReLU -> MaxPool 2x2] x blocks -> Flatten -> Dense + ReLU
    -> Dropout -> Dense."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        side = cfg.image_side
        assert side is not None
        self.side = side
        layers: list[nn.Module] = []
        channels, filters, size = 1, cfg.conv_filters, side
        for _ in range(cfg.conv_blocks):
            layers.append(nn.Conv2d(channels, filters, kernel_size=3, padding=1))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(filters))
            layers += [nn.ReLU(), MaxPool2x2()]
            channels, filters, size = filters, filters * 2, size // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(channels * size**2, cfg.hidden),
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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())


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


def inference_copy(model: nn.Module) -> nn.Module:
    """`model` (in eval mode) as it is best run for predictions: in every Sequential, a
    BatchNorm2d after a Conv2d folded into that convolution (weights scaled by
    gamma / sigma, the bias shifted: the same function to float rounding, 4e-7 on the
    digits' probabilities), and Dropout, the identity in eval mode, left out. Two ops and
    three module calls fewer per block of the default ConvNet, most of a small pass's time
    (Python dispatch). `model` itself is untouched: it is what is saved, and trained on; a
    model with nothing to fold comes back as it is."""
    if not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in model.modules()):
        return model
    with torch.inference_mode(False), torch.no_grad():
        folded = copy.deepcopy(model).eval()
        for module in list(folded.modules()):
            if isinstance(module, nn.Sequential):
                module._modules = _folded(module._modules)
    return folded


def _folded(layers: OrderedDict) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    items = list(layers.items())
    i = 0
    while i < len(items):
        name, layer = items[i]
        following = items[i + 1][1] if i + 1 < len(items) else None
        if (
            isinstance(layer, nn.Conv2d)
            and isinstance(following, nn.BatchNorm2d)
            and following.track_running_stats  # else eval mode uses the batch's statistics
            and following.running_mean is not None
        ):
            out[name] = fuse_conv_bn_eval(layer, following)
            i += 2
            continue
        if not isinstance(layer, nn.Dropout):
            out[name] = layer
        i += 1
    return out


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
        self._forward = inference_copy(self.model)  # what predictions run
        self.cfg = cfg
        self.preprocessor = preprocessor
        self.device = torch.device(device)
        # confidence -> chance of being right, fitted on the validation split at training
        # time (pipeline/performance.py); None for a model saved before it existed
        self.calibration: Calibration | None = None

    @classmethod
    def from_dir(cls, path: Path, device: torch.device | str = "cpu") -> Predictor:
        """Load `checkpoint.pt` + `preprocessor.json` (+ `calibration.json`) from a model
        directory."""
        path = Path(path)
        for name in (CHECKPOINT, PREPROCESSOR_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: model directory lacks {name}")
        model, cfg = load_checkpoint(path / CHECKPOINT, device)
        predictor = cls(model, cfg, Preprocessor.load(path / PREPROCESSOR_FILE), device)
        predictor.calibration = Calibration.load(path)
        return predictor

    def save(self, path: Path) -> None:
        save_checkpoint(self.model, self.cfg, Path(path) / CHECKPOINT)
        self.preprocessor.save(Path(path) / PREPROCESSOR_FILE)
        if self.calibration is not None:
            self.calibration.save(path)

    @torch.inference_mode()
    def probabilities(self, transformed: np.ndarray) -> np.ndarray:
        """Probabilities of already preprocessed rows (the training splits)."""
        x = torch.from_numpy(np.ascontiguousarray(transformed, np.float32)).to(self.device)
        return torch.softmax(self._forward(x).float(), dim=1).cpu().numpy()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.preprocessor.schema.feature_names

    @torch.inference_mode()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, F) raw features -> (n, classes) float32 probabilities."""
        x = torch.from_numpy(self.preprocessor.transform(features)).to(self.device)
        return torch.softmax(self._forward(x).float(), dim=1).cpu().numpy()

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.predict_proba(features).argmax(axis=1)
