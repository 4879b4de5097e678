"""The FastAPI prediction server."""
