"""What a flow run shows in the Prefect UI: its summary as a markdown table artifact."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact


def publish_summary(key: str, description: str, fields: dict) -> None:
    """One `| field | value |` table, keyed so the UI keeps its history."""
    lines = ["| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in fields.items()]
    create_markdown_artifact("\n".join(lines), key=key, description=description)
