"""The closed loop as a Prefect flow; its body reads like the diagram:

data source -> data processing -> training -> optimisation -> deployment -> feedback -> data source

Deployment is a safe rollout once a champion exists: the round's candidate is scored in
shadow on the first half of the round's traffic, the gate decides on the test split plus
those labelled shadow rows, and a candidate that passes takes a canary share of the second
half, where the servers' guard rails promote it or roll it back.
"""

from __future__ import annotations

import dataclasses
import time

from prefect import flow

from flows.report import publish_params, publish_summary
from flows.tasks import (
    await_canary,
    check_drift,
    deploy,
    gate_for_canary,
    ingest_source,
    loop_guards,
    plan_stream,
    preprocess_data,
    promote,
    pull_feedback,
    send_labels,
    send_traffic,
    shadow_candidate,
    shadow_figures,
    start_api,
    start_canary,
    stop_api,
    train_model,
    version_data,
)
from pipeline import progress, stream
from pipeline.config import LOOP_ROUNDS, Params, get_settings, load_params
from pipeline.registry import CHAMPION, alias_version

FAULTY_ROUND = 2  # --faulty-candidate: the round whose candidate is deliberately bad


@flow(name="mlops-loop", flow_run_name="loop: {rounds} rounds", log_prints=True)
def loop_flow(
    rounds: int = LOOP_ROUNDS,
    source: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    drift: bool = False,
    params: Params | None = None,
    allow_schema_change: bool = False,
    faulty_candidate: bool = False,
    label_budget: int | None = None,
    label_strategy: str = "uncertainty",
) -> list[dict]:
    """`rounds` turns of the loop. Unset arguments come from params.yaml (`params`: all of
    it, recorded with the run); `source` defaults to params' data.source.

    `faulty_candidate`: round 2's candidate is trained with a learning rate 1,000 times too
    small for one epoch, and sent to the canary whatever the gate says, so the guard rails
    can be seen rolling it back. `label_budget`: each round labels only that many of its
    rows, the ones `label_strategy` ranks first (pipeline/labelqueue.py), not all of them."""
    labels = {"budget": label_budget, "strategy": label_strategy}
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
            faulty = faulty_candidate and round_no == FAULTY_ROUND
            round_params, round_trials, round_epochs = params, trials, epochs
            if faulty:
                lr = params.train.lr / 1000
                round_params, round_trials, round_epochs = params.updated(train={"lr": lr}), 0, 1
            model = train_model(  # training + optimisation
                settings, round_params, round_no, round_trials, round_epochs, warm
            )
            row = {
                "round": round_no,
                "data_version": data_hash[:10],
                "rows": split["rows"]["train"] + split["rows"]["val"] + split["rows"]["test"],
                "feedback_rows": split["feedback_rows"],
                "model_version": model["version"],
                "test_accuracy": model["accuracy"],
            }
            chunk = chunks[round_no - 1]
            started = time.time()
            champion = alias_version(settings.model_name, CHAMPION)
            if champion is None or chunk is None or chunk.size < 2:
                # nothing to compare with, or no traffic to roll out on: the gate alone
                decision = promote(settings, params, model["version"])
                row.update(promoted=decision["promoted"], decision=_verdict(decision))
                row["serving"] = deploy(server)  # deployment
                if chunk is not None:  # feedback
                    traffic = send_traffic(settings, server, chunk, round_no, drift)
                    send_labels(settings, server, chunk, traffic["ids"], round_no, **labels)
                reason = decision["reason"]
            else:
                row.update(
                    _safe_rollout(
                        settings,
                        params,
                        server,
                        model["version"],
                        chunk,
                        round_no,
                        drift,
                        faulty,
                        labels,
                    )
                )
                reason = row.pop("reason")
            if chunk is not None:
                row["drift_score"] = check_drift(settings, params, started).get("score")
                row["pulled"] = pull_feedback(settings)["new"]  # -> data source
            summary.append(row)
            title = f"round {round_no} of the loop"
            publish_summary(f"loop-round-{round_no}", title, {**row, "promotion": reason})
        if any(chunks):
            version_data(settings)  # the last pull becomes a data version too
    finally:
        stop_api(server)
    return summary


def _verdict(decision: dict) -> str:
    return "promoted" if decision["promoted"] else "kept"


def _safe_rollout(
    settings, params, server, version, chunk, round_no, drift, faulty, labels: dict
) -> dict:
    """Shadow on the first half of the round's traffic, the gate on test split + shadow
    labels, then a canary on the second half."""
    half = chunk.size // 2
    first = stream.Chunk(chunk.stream_hash, chunk.start, half)
    second = dataclasses.replace(chunk, start=chunk.start + half, size=chunk.size - half)
    shadow_candidate(settings, server, version)  # deployment, in shadow
    started = time.time()
    traffic = send_traffic(settings, server, first, round_no, drift, part="a")
    half_budget = None if labels["budget"] is None else max(1, labels["budget"] // 2)
    budget = {**labels, "budget": half_budget}
    send_labels(settings, server, first, traffic["ids"], round_no, part="a", **budget)
    shadow = shadow_figures(settings, started)
    gate = gate_for_canary(settings, params, version)
    out: dict = {
        "shadow_agreement": shadow["agreement"] if shadow else None,
        "shadow_accuracy": shadow["shadow_accuracy"] if shadow else None,
        "gate": ("pass" if gate["passed"] else "no")
        + (f" p={gate['p_value']:.2f}" if gate["p_value"] is not None else ""),
        "reason": gate["reason"],
        "promoted": False,
        "decision": "kept",
    }
    if gate["passed"] or faulty:
        guards = loop_guards(
            params,
            expected_rows=int(second.size * params.rollout.fraction),
            all_labelled=labels["budget"] is None,
        )
        # the demo's canary takes at least a third of the clients, so its share is seen
        fraction = max(params.rollout.fraction, 0.34)
        start_canary(settings, server, guards, version, fraction, gate)
        traffic = send_traffic(settings, server, second, round_no, drift, part="b")
        send_labels(settings, server, second, traffic["ids"], round_no, part="b", **budget)
        canary = await_canary(settings, guards)
        out["canary"] = canary["outcome"]
        out["canary_rows"] = traffic["served"].get(version, 0)
        out["promoted"] = canary["outcome"] == "promoted"
        out["decision"] = {"promoted": "canary ok", "rolled back": "rollback"}.get(
            canary["outcome"], "-"
        )
        out["reason"] = canary["reason"] or out["reason"]
    else:
        traffic = send_traffic(settings, server, second, round_no, drift, part="b")
        send_labels(settings, server, second, traffic["ids"], round_no, part="b", **budget)
    out["serving"] = deploy(server)
    return out
