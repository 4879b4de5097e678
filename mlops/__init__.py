"""The `mlops` command: the top layer, on pipeline/ (the library), flows/ (Prefect) and
serving/ (FastAPI). Thin: each command parses its options, calls one or two functions
below it, and prints the outcome."""
