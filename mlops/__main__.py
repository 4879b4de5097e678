"""`python -m mlops` runs the `mlops` command."""

from mlops.cli import app

app()
