"""Prefect tasks and flows that compose pipeline/ into the loop."""
