"""The bench's LitServe peer: the project's model behind LitServe's batching.
Run inside the LitServe virtualenv by bench/peers.py:
python litserve_app.py MODEL_DIR PORT [WORKERS]"""

import os
import sys

import litserve as ls
import numpy as np
import torch

from pipeline.model import Predictor


class ClassifierAPI(ls.LitAPI):
    def __init__(self, model_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self._sizes: list[int] = []

    def setup(self, device) -> None:
        torch.set_num_threads(int(os.environ.get("MLOPS_BENCH_THREADS", "1")))
        self.predictor = Predictor.from_dir(self.model_dir)

    def decode_request(self, request):
        return np.asarray(request["instances"], dtype=np.float32)

    def batch(self, inputs):
        self._sizes = [len(x) for x in inputs]
        return np.concatenate(inputs)

    def predict(self, x):
        return self.predictor.predict_proba(x)

    def unbatch(self, output):
        return np.split(output, np.cumsum(self._sizes)[:-1])

    def encode_response(self, probs):
        return {
            "predictions": [{"label": int(p.argmax()), "probabilities": p.tolist()} for p in probs]
        }


if __name__ == "__main__":
    model_dir, port = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    api = ClassifierAPI(model_dir, max_batch_size=64, batch_timeout=0.002)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)
