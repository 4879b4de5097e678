"""MLflow models-from-code definition of the pyfunc (logged as code, so no pickle).

Loaded by `mlflow.pyfunc.load_model` and `mlflow models serve`: takes raw feature rows
(a DataFrame with the feature columns, or a 2-D array in feature order), applies the
training-time preprocessor, and returns one row per input: `label` and `prob_0..prob_{C-1}`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class ClassifierPyfunc(PythonModel):
    # `predict` takes a DataFrame or a 2-D array on purpose, and the signature logged with the
    # model is what MLflow validates inputs against. Without this, MLflow warns twice per
    # model that `predict` lacks type hints (inside its own "once" filter, so a warnings
    # filter of ours cannot hold it back); MLflow's ChatModel skips the check the same way.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pipeline.model import Predictor

        self.predictor = Predictor.from_dir(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        names = list(self.predictor.feature_names)
        try:  # integer or float columns alike (the signature accepts any numeric type)
            if isinstance(model_input, pd.DataFrame) and set(names) <= set(model_input.columns):
                rows = model_input[names].to_numpy(dtype=np.float32)
            else:
                rows = np.asarray(model_input, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the feature columns must hold numbers only: {exc}") from None
        if rows.ndim != 2 or rows.shape[1] != len(names):
            raise ValueError(f"expected rows of {len(names)} features, got shape {rows.shape}")
        if not np.isfinite(rows).all():
            raise ValueError("the features hold NaN, infinite or too large values")
        probs = self.predictor.predict_proba(rows)
        out = pd.DataFrame(probs, columns=[f"prob_{i}" for i in range(probs.shape[1])])
        out.insert(0, "label", probs.argmax(axis=1))
        return out


mlflow.models.set_model(ClassifierPyfunc())
