"""What a flow run shows in the Prefect UI: the parameters it ran with, and its summary,
as markdown artifacts attached to the run."""

from __future__ import annotations

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
