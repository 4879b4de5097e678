"""The closed loop as a Prefect flow; its body reads like the diagram:

data source -> data processing -> training -> optimisation -> deployment -> feedback -> data source
"""

from __future__ import annotations

import time

from prefect import flow

from flows.report import publish_params, publish_summary
from flows.tasks import (
    check_drift,
    deploy,
    ingest_source,
    plan_stream,
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
from pipeline import progress
from pipeline.config import LOOP_ROUNDS, Params, get_settings, load_params


@flow(name="mlops-loop", flow_run_name="loop: {rounds} rounds", log_prints=True)
def loop_flow(
    rounds: int = LOOP_ROUNDS,
    source: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    drift: bool = False,
    params: Params | None = None,
    allow_schema_change: bool = False,
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
    # data source: the bootstrap pool + the held-out production stream
    ingest_source(settings, params, source, allow_schema_change)
    chunks = plan_stream(settings, params, rounds)
    server = start_api(settings)
    summary: list[dict] = []
    try:
        for round_no in range(1, rounds + 1):
            progress.report("round", round=round_no, rounds=rounds)
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
            chunk = chunks[round_no - 1]
            if chunk is not None:  # feedback
                started = time.time()
                traffic = send_traffic(settings, server, chunk, round_no, drift)
                send_labels(settings, server, chunk, traffic["ids"], round_no)
                row["drift_score"] = check_drift(settings, params, started).get("score")
                row["pulled"] = pull_feedback(settings)["new"]  # -> data source
            summary.append(row)
            publish_summary(
                f"loop-round-{round_no}",
                f"round {round_no} of the loop",
                {**row, "promotion": decision["reason"]},
            )
        if any(chunks):
            version_data(settings)  # the last pull becomes a data version too
    finally:
        stop_api(server)
    return summary
