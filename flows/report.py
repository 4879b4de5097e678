"""What a flow run shows in the Prefect UI: the parameters it ran with, and its summary,
as markdown artifacts attached to the run."""

from __future__ import annotations

import time

import yaml
from prefect.artifacts import create_markdown_artifact

from pipeline.config import Params


def publish_params(params: Params) -> None:
    """The whole resolved params.yaml, as this run used it (Prefect records task arguments
    only as references, and a scheduled run's `params` argument is empty)."""
    text = yaml.safe_dump(params.model_dump(), sort_keys=False)
    create_markdown_artifact(
        f"```yaml\n{text}```", key="params", description="the parameters this run used"
    )


def publish_summary(key: str, description: str, fields: dict) -> None:
    """One `| field | value |` table, keyed so the UI keeps its history."""
    lines = ["| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in fields.items()]
    create_markdown_artifact("\n".join(lines), key=key, description=description)


def publish_performance(windows: list[dict]) -> None:
    """Coverage, label latency, realized and estimated accuracy per version and window."""
    lines = [
        "| version | window start | rows | coverage | label latency p50 | status | realized "
        "| estimated (95%) | confidence shift |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in windows[-48:]:
        est = "-"
        if w["estimated"] is not None:
            est = f"{w['estimated']:.3f} [{w['estimated_low']:.3f}, {w['estimated_high']:.3f}]"
        lines.append(
            f"| v{w['version']} | {time.strftime('%Y-%m-%d %H:%M', time.gmtime(w['start']))} "
            f"| {w['rows']} | {w['coverage']:.0%} | "
            + ("-" if w["latency_p50_s"] is None else f"{w['latency_p50_s']:.0f} s")
            + f" | {w['status']} | "
            + ("-" if w["realized"] is None else f"{w['realized']:.3f}")
            + f" | {est} | "
            + ("-" if w.get("confidence_shift") is None else f"{w['confidence_shift']:.2f}")
            + " |"
        )
    create_markdown_artifact(
        "\n".join(lines), key="live-performance", description="live performance per window"
    )
