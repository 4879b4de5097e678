"""The bench's MLServer peer: a custom runtime serving the project's model (MLServer's
adaptive batching configured in the model-settings.json that bench/peers.py writes)."""

import os

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from pipeline.model import Predictor


class Classifier(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(int(os.environ.get("MLOPS_BENCH_THREADS", "1")))
        self.predictor = Predictor.from_dir(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        probs = self.predictor.predict_proba(rows)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output("label", probs.argmax(axis=1).astype(np.int64)),
                NumpyCodec.encode_output("probabilities", probs),
            ],
        )
