"""Hyperparameter search with Optuna: TPE sampler, median pruner fed the validation accuracy.

The objective is the best validation accuracy a trial reached (the metric that early
stopping keeps). The first trial is always the configured defaults, so the search can only
keep or improve on them on the validation split.

The search space lives in params.yaml (`tune.space`, typed by pipeline/config.py):

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float range (log-uniform when log: true)
    batch_size: [32, 64, 128]                    # categorical choice

Each trial is a nested MLflow run under the caller's active run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import mlflow
import optuna

from pipeline import progress
from pipeline.config import Range
from pipeline.tracking import EpochLogger
from pipeline.train import SplitData, TrainParams, train_model

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    best_params: dict
    best_val_accuracy: float
    n_trials: int
    n_pruned: int


def suggest(trial: optuna.Trial, space: dict[str, list | Range]) -> dict:
    """Draw one point of the params.yaml search space."""
    drawn = {}
    for name, spec in space.items():  # names checked by config.TuneParams
        if isinstance(spec, list):
            drawn[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec.low, int) and isinstance(spec.high, int) and not spec.log:
            drawn[name] = trial.suggest_int(name, spec.low, spec.high)
        else:
            drawn[name] = trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.log)
    return drawn


def tune(
    data: SplitData,
    base: TrainParams,
    space: dict[str, list | Range],
    n_trials: int,
    timeout_s: float | None = None,
    device: str = "cpu",
    log_trials: bool = True,
) -> TuneResult:
    """Run the study; each trial is a nested MLflow run under the active (parent) run."""
    sampler = optuna.samplers.TPESampler(seed=base.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    defaults = {name: getattr(base, name) for name in space}
    if _inside(defaults, space):
        study.enqueue_trial(defaults)

    def objective(trial: optuna.Trial) -> float:
        params = replace(base, **suggest(trial, space))
        progress.report("trial_start", number=trial.number, trials=n_trials)
        with mlflow.start_run(
            run_name=f"trial-{trial.number}", nested=True, log_system_metrics=False
        ) as run:
            mlflow.log_params({k: getattr(params, k) for k in space})
            logger = EpochLogger(run.info.run_id) if log_trials else None

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                if logger:
                    logger(epoch, metrics)
                trial.report(metrics["val_accuracy"], epoch)
                if trial.should_prune():
                    mlflow.set_tag("pruned", "true")
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            try:
                result = train_model(data, params, device, on_epoch=on_epoch, show_progress=False)
            except optuna.TrialPruned as exc:  # its run ends FINISHED, tagged pruned: not FAILED
                pruned: optuna.TrialPruned | None = exc
            else:
                pruned = None
                mlflow.log_metrics(
                    {
                        "best_val_accuracy": result.best_val_accuracy,
                        "best_val_loss": result.best_val_loss,
                    }
                )
        if pruned is not None:
            progress.report("trial_end", number=trial.number, trials=n_trials, pruned=True)
            raise pruned
        progress.report(
            "trial_end",
            number=trial.number,
            trials=n_trials,
            pruned=False,
            val_accuracy=result.best_val_accuracy,
        )
        log.info(
            "trial %d/%d: val accuracy %.4f (%s)",
            trial.number + 1,
            n_trials,
            result.best_val_accuracy,
            ", ".join(f"{k} {getattr(params, k):.3g}" for k in space),
        )
        return result.best_val_accuracy

    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, catch=())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError("no tuning trial completed: raise tune.timeout_s or tune.trials")
    best = study.best_trial
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    if mlflow.active_run():
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.log_metrics(
            {"best_val_accuracy": best.value, "trials": len(study.trials), "trials_pruned": pruned}
        )
    return TuneResult(
        dict(best.params),
        float(best.value if best.value is not None else 0.0),
        len(study.trials),
        pruned,
    )


def _inside(point: dict, space: dict[str, list | Range]) -> bool:
    """Whether the defaults are a point of the search space (Optuna refuses others)."""
    for name, spec in space.items():
        value = point[name]
        if isinstance(spec, list):
            if value not in spec:
                return False
        elif not spec.low <= value <= spec.high:
            return False
    return True
