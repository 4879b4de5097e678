"""Peer servers for bench/serving.py: LitServe, MLServer and BentoML, each in its own
virtualenv (created on first use, pinned, cached under ~/.cache/mlops-bench), each serving
the same exported model directory (checkpoint + preprocessor, loaded with the project's own
`Predictor`, so every server runs the very same eager PyTorch forward) with the
framework's recommended batching on, access logs off, one worker, torch threads pinned as
`mlops serve` pins them, bound to 127.0.0.1 only.

Request bodies: LitServe and BentoML take `{"instances": [[...]]}` like `/predict`;
MLServer takes the Open Inference Protocol (V2) tensor JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVERS = Path(__file__).resolve().parent / "peer_servers"
CACHE = Path(os.environ.get("MLOPS_BENCH_CACHE", Path.home() / ".cache" / "mlops-bench"))
# what the project's model code needs beside torch (pipeline.model -> preprocess -> config)
MODEL_DEPS = ["numpy<3", "pandas>=2", "pyyaml>=6", "pydantic>=2.7", "pydantic-settings>=2.3"]


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    packages: tuple[str, ...]
    v2: bool  # speaks the Open Inference Protocol (V2) instead of {"instances": ...}


PEERS = {
    "litserve": Peer("litserve", "LitServe 0.2.19 (batching)", ("litserve==0.2.19",), False),
    "mlserver": Peer("mlserver", "MLServer 1.7.1 (adaptive batching)", ("mlserver==1.7.1",), True),
    "bentoml": Peer("bentoml", "BentoML 1.4.40 (adaptive batching)", ("bentoml==1.4.40",), False),
}


def venv(peer: Peer, torch_spec: str = "torch==2.13.0") -> Path:
    """The peer's own virtualenv, made once: torch with pip (it takes the build on disk,
    as the Makefile does), the rest pinned."""
    home = CACHE / f"{peer.name}-{'-'.join(p.split('==')[1] for p in peer.packages)}"
    python = home / "bin" / "python"
    if (home / ".ready").exists():
        return python
    print(f"  creating the {peer.name} virtualenv in {home} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, torch_spec], check=True)
    subprocess.run([*pip, *peer.packages, *MODEL_DEPS], check=True)
    (home / ".ready").touch()
    return python


def command(
    peer: Peer, python: Path, model_dir: Path, port: int, workdir: Path, workers: int = 1
) -> list[str]:
    """The command line that starts `peer` on 127.0.0.1:port serving `model_dir` with
    `workers` inference processes (BentoML reads its count from MLOPS_BENCH_WORKERS)."""
    if peer.name == "litserve":
        script = str(SERVERS / "litserve_app.py")
        return [str(python), script, str(model_dir), str(port), str(workers)]
    if peer.name == "bentoml":
        return [
            str(python),
            "-m",
            "bentoml",
            "serve",
            "bentoml_service:Classifier",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--working-dir",
            str(SERVERS),
        ]
    # MLServer: a settings.json (server) and a model-settings.json (the model) in workdir
    model = workdir / "mlserver-model"
    model.mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": 0,
                "metrics_port": 0,
                "metrics_endpoint": None,
                "parallel_workers": workers if workers > 1 else 0,
                "debug": False,
            }
        )
    )
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "classifier",
                "implementation": "mlserver_model.Classifier",
                "max_batch_size": 64,
                "max_batch_time": 0.002,
                "parameters": {"uri": str(model_dir)},
            }
        )
    )
    return [str(python.parent / "mlserver"), "start", str(workdir)]


def env(peer: Peer, base: dict, model_dir: Path) -> dict:
    """PYTHONPATH: the project (for its model code) and the peer's server module."""
    threads = str(max(1, (os.cpu_count() or 2) - 1))
    return {
        **base,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(SERVERS)]),
        "MLOPS_BENCH_THREADS": threads,
        "MLOPS_BENCH_MODEL_DIR": str(model_dir),
        "BENTOML_DO_NOT_TRACK": "true",
        "DO_NOT_TRACK": "1",
    }


def health_path(peer: Peer) -> str:
    return {"litserve": "/health", "mlserver": "/v2/health/ready", "bentoml": "/readyz"}[peer.name]


def predict_path(peer: Peer) -> str:
    return {
        "litserve": "/predict",
        "mlserver": "/v2/models/classifier/infer",
        "bentoml": "/predict",
    }[peer.name]
