"""Canary rollouts: a candidate takes a share of the clients, guard rails watch it, and it is
promoted or rolled back on the figures.

The rollout lives in the prediction store (`rollouts` table), the database every server
process, flow and CLI of a deployment already shares, so `--workers N` and several replicas
split traffic and judge the guards alike. Servers route a client to the candidate by a hash
of its id (sticky: a client sees one version) and log every answered row under the version
that answered; rows the candidate failed are answered by the champion and counted in
`serving_events`. The guards compare the candidate with the champion over the rollout's own
period: error rate, p99 latency and, once both have labelled rows, accuracy. A breach rolls
back at once; passing for `window_s` with enough rows (and, with `require_labels`, accuracy
judged) promotes. Every step is a ledger entry.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field

from pipeline import ledger
from pipeline.config import RolloutParams, Settings
from pipeline.registry import (
    RegistryError,
    check_loads,
    current_champion,
    resolve,
    set_champion,
)
from pipeline.store import LockTimeout, PredictionStore

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    decision: str  # wait | promote | abort
    reasons: list[str]
    figures: dict[str, float] = field(default_factory=dict)


def bucket(client_id: str) -> float:
    """A client's place in [0, 1): the same on every process and every run (crc32)."""
    return zlib.crc32(client_id.encode()) / 2**32


def guards_of(rollout: dict) -> RolloutParams:
    return RolloutParams.model_validate(json.loads(rollout["guards"]))


def _store(settings: Settings) -> PredictionStore:
    return PredictionStore(settings.prediction_db).create()


def start(
    settings: Settings,
    candidate: str,
    guards: RolloutParams,
    fraction: float | None = None,
    why: str = "",
    figures: dict | None = None,
) -> dict:
    """Start a canary of `candidate` (a version number or alias) at `fraction`; `why` and
    `figures` (the gate's, when it sent the candidate here) go into the ledger entry."""
    name = settings.model_name
    candidate = str(resolve(name, candidate).version)
    check_loads(name, candidate)
    champion = current_champion(settings)
    if champion is None:
        raise RegistryError("there is no champion yet: promote a first version instead")
    if champion == candidate:
        raise RegistryError(f"v{candidate} is already the champion")
    guards = guards.model_copy(update={"fraction": fraction or guards.fraction})
    RolloutParams.model_validate(guards.model_dump())  # the fraction in range, like params'
    store = _store(settings)
    try:
        try:
            seq = store.start_rollout(
                name, candidate, champion, guards.fraction, guards.model_dump_json()
            )
        except ValueError as exc:
            raise RegistryError(str(exc)) from exc
    finally:
        store.dispose()
    ledger.record(
        settings,
        "rollout-start",
        champion,
        candidate,
        f"canary: v{candidate} takes {guards.fraction:.0%} of clients beside champion "
        f"v{champion}; promoted after {guards.window_s:g} s within the guard rails"
        + (" once accuracy was judged" if guards.require_labels else "")
        + (f" ({why})" if why else ""),
        {"fraction": guards.fraction, **(figures or {})},
        candidate=candidate,
    )
    return {"seq": seq, "candidate": candidate, "champion": champion, **guards.model_dump()}


def evaluate(store: PredictionStore, rollout: dict, now: float | None = None) -> Verdict:
    """The guard rails on the rollout's period so far (read-only)."""
    now = time.time() if now is None else now
    g = guards_of(rollout)
    cand, champ = rollout["candidate"], rollout["champion"]
    stats = store.version_stats(rollout["model_name"], rollout["started_at"])
    c, h = stats.get(cand, {}), stats.get(champ, {})
    served, failed = c.get("rows", 0), c.get("failed_rows", 0)
    figures: dict[str, float] = {
        "fraction": rollout["fraction"],
        "elapsed_s": now - rollout["started_at"],
        "candidate_rows": float(served),
        "candidate_failed_rows": float(failed),
        "champion_rows": float(h.get("rows", 0)),
    }
    attempted = served + failed
    if attempted < g.min_samples:
        return Verdict("wait", [f"{attempted} candidate rows of {g.min_samples}"], figures)
    breaches = []
    error_rate = failed / attempted
    figures["candidate_error_rate"] = error_rate
    if error_rate > g.max_error_rate:
        breaches.append(f"error rate {error_rate:.3f} > {g.max_error_rate}")
    p99_c, p99_h = c.get("p99_ms"), h.get("p99_ms")
    if p99_c is not None and p99_h is not None:
        figures.update(candidate_p99_ms=p99_c, champion_p99_ms=p99_h)
        limit = p99_h * g.max_p99_ratio + g.p99_slack_ms
        if p99_c > limit:
            breaches.append(f"p99 {p99_c:.1f} ms > {limit:.1f} ms (champion {p99_h:.1f} ms)")
    if c.get("labelled", 0) >= g.min_labels and h.get("labelled", 0) >= g.min_labels:
        acc_c, acc_h = c["accuracy"], h["accuracy"]
        figures.update(candidate_accuracy=acc_c, champion_accuracy=acc_h)
        figures.update(candidate_labelled=c["labelled"], champion_labelled=h["labelled"])
        if acc_c < acc_h - g.max_accuracy_drop:
            breaches.append(
                f"accuracy {acc_c:.3f} vs champion {acc_h:.3f} on labelled rows "
                f"(more than {g.max_accuracy_drop} lower)"
            )
    if breaches:
        return Verdict("abort", breaches, figures)
    if now - rollout["started_at"] >= g.window_s:
        if g.require_labels and "candidate_accuracy" not in figures:
            return Verdict(
                "wait",
                [
                    f"window over; accuracy not judged yet: {c.get('labelled', 0)} candidate "
                    f"and {h.get('labelled', 0)} champion labelled rows of {g.min_labels} each"
                ],
                figures,
            )
        return Verdict("promote", [f"within the guard rails for {g.window_s:g} s"], figures)
    left = g.window_s - (now - rollout["started_at"])
    return Verdict("wait", [f"within the guard rails; {left:.0f} s of the window left"], figures)


def step(settings: Settings, store: PredictionStore | None = None) -> Verdict | None:
    """Evaluate the running rollout and act on a decision (under a lease, so one process
    decides); None when nothing runs or another process is deciding right now."""
    own = store is None
    store = store or _store(settings)
    try:
        try:
            with store.lock(f"rollout:{settings.model_name}", ttl_s=60, wait_s=0):
                rollout = store.running_rollout(settings.model_name)
                if rollout is None:
                    return None
                verdict = evaluate(store, rollout)
                if verdict.decision == "abort":
                    _end(settings, store, rollout, "aborted", "; ".join(verdict.reasons), verdict)
                elif verdict.decision == "promote":
                    _end(settings, store, rollout, "promoted", verdict.reasons[0], verdict)
                return verdict
        except LockTimeout:
            return None
    finally:
        if own:
            store.dispose()


def finish(settings: Settings, action: str, reason: str) -> dict:
    """`mlops rollout promote|abort`: end the running rollout by hand."""
    store = _store(settings)
    try:
        with store.lock(f"rollout:{settings.model_name}", ttl_s=60, wait_s=30):
            rollout = store.running_rollout(settings.model_name)
            if rollout is None:
                raise RegistryError("no rollout is running")
            verdict = evaluate(store, rollout)
            state = "promoted" if action == "promote" else "aborted"
            _end(settings, store, rollout, state, reason, verdict)
            return {**rollout, "state": state, "figures": verdict.figures}
    except LockTimeout as exc:
        raise RegistryError(f"the rollout is being decided by another process: {exc}") from exc
    finally:
        store.dispose()


def _end(settings, store, rollout: dict, state: str, reason: str, verdict: Verdict) -> None:
    cand, champ = rollout["candidate"], rollout["champion"]
    if state == "promoted":
        text = f"canary v{cand} promoted: {reason}"
        set_champion(settings, cand, reason=text, metrics=verdict.figures)
    else:
        text = f"canary v{cand} rolled back, v{champ} keeps all traffic: {reason}"
        ledger.record(settings, "rollout-abort", cand, champ, text, verdict.figures, candidate=cand)
    store.end_rollout(rollout["seq"], state, text)
    log.log(logging.WARNING if state == "aborted" else logging.INFO, "%s", text)


def status(settings: Settings) -> dict | None:
    """The running rollout with its guard figures, or the last one that ended."""
    store = _store(settings)
    try:
        rollout = store.running_rollout(settings.model_name) or store.latest_rollout(
            settings.model_name
        )
        if rollout is None:
            return None
        out = {k: v for k, v in rollout.items() if k != "guards"}
        out["guards"] = json.loads(rollout["guards"])
        if rollout["state"] == "running":
            verdict = evaluate(store, rollout)
            out.update(decision=verdict.decision, reasons=verdict.reasons, figures=verdict.figures)
        return out
    finally:
        store.dispose()
