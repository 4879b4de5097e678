"""The bench's BentoML peer: the project's model behind a batchable BentoML API.
bench/peers.py starts it with `bentoml serve bentoml_service:Classifier`."""

import os

import bentoml
import numpy as np
import torch

from pipeline.model import Predictor


@bentoml.service(
    workers=int(os.environ.get("MLOPS_BENCH_WORKERS", "1")), logging={"access": {"enabled": False}}
)
class Classifier:
    def __init__(self) -> None:
        torch.set_num_threads(int(os.environ.get("MLOPS_BENCH_THREADS", "1")))
        self.predictor = Predictor.from_dir(os.environ["MLOPS_BENCH_MODEL_DIR"])

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=1000)
    def predict(self, instances: np.ndarray) -> np.ndarray:
        return self.predictor.predict_proba(instances.astype(np.float32))
