"""The closed loop as a Prefect flow; its body reads like the diagram:

data source -> data processing -> training -> optimisation -> deployment -> feedback -> data source
"""

from __future__ import annotations

import time
import uuid

import numpy as np
from prefect import flow, get_run_logger

from flows.report import publish_params, publish_summary
from flows.tasks import (
    check_drift,
    deploy,
    ingest_source,
    preprocess_data,
    promote,
    pull_feedback,
    send_labels,
    send_traffic,
    start_api,
    stop_api,
    train_model,
    version_data,
)
from pipeline.config import LOOP_ROUNDS, Params, get_settings, load_params
from pipeline.ingest import load_digits_frame


def production_stream(
    params: Params, rounds: int, drift: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The digits the bootstrap pool left out, in `rounds` chunks: what clients will send.

    With `drift`, every image is shifted two pixels right (zeros shifted in), a change of
    the input distribution that the drift check must see.
    """
    stream = load_digits_frame("stream", params.data.bootstrap_fraction, params.seed)
    x = stream.drop(columns="label").to_numpy(np.float32)
    y = stream["label"].to_numpy()
    if drift:
        images = x.reshape(-1, 8, 8)
        shifted = np.zeros_like(images)
        shifted[:, :, 2:] = images[:, :, :-2]
        x = shifted.reshape(-1, 64)
    return [
        (xs, ys)
        for xs, ys in zip(np.array_split(x, rounds), np.array_split(y, rounds), strict=True)
    ]


@flow(name="mlops-loop", flow_run_name="loop: {rounds} rounds", log_prints=True)
def loop_flow(
    rounds: int = LOOP_ROUNDS,
    source: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    drift: bool = False,
    params: Params | None = None,
) -> list[dict]:
    """`rounds` turns of the loop. Unset arguments come from params.yaml (`params`: all of
    it, recorded with the run); `source` defaults to params' data.source."""
    settings = get_settings()
    params = params or load_params(settings.params_path)
    source = source or params.data.source
    params = params.updated(data={"source": source})  # what the runs are tagged with
    publish_params(params)
    trials = params.tune.trials if trials is None else trials
    warm = params.train.warm_start
    if source != "digits":
        get_run_logger().warning(
            "source %s: no production stream to simulate; the loop "
            "trains once per round on the data it has",
            source,
        )
    stream = production_stream(params, rounds, drift) if source == "digits" else []

    run_tag = uuid.uuid4().hex[:8]  # this run's client ids are its own
    ingest_source(settings, params, source)
    server = start_api(settings)
    summary: list[dict] = []
    try:
        for round_no in range(1, rounds + 1):
            data_hash = version_data(settings)  # data source
            split = preprocess_data(settings, params, data_hash)  # data processing
            model = train_model(  # training + optimisation
                settings, params, round_no, trials, epochs, warm
            )
            decision = promote(settings, params, model["version"])
            serving = deploy(server)  # deployment
            row = {
                "round": round_no,
                "data_version": data_hash[:10],
                "rows": split["rows"]["train"] + split["rows"]["val"] + split["rows"]["test"],
                "feedback_rows": split["feedback_rows"],
                "model_version": model["version"],
                "test_accuracy": model["accuracy"],
                "promoted": decision["promoted"],
                "serving": serving,
            }
            if stream:  # feedback
                x, y = stream[round_no - 1]
                started = time.time()
                traffic = send_traffic(server, x, round_no, run_tag=run_tag)
                send_labels(server, traffic["ids"], y, round_no)
                row["drift_score"] = check_drift(settings, params, started).get("score")
                row["pulled"] = pull_feedback(settings)["new"]  # -> data source
            summary.append(row)
            publish_summary(
                f"loop-round-{round_no}",
                f"round {round_no} of the loop",
                {**row, "promotion": decision["reason"]},
            )
        if stream:
            version_data(settings)  # the last pull becomes a data version too
    finally:
        stop_api(server)
    return summary
