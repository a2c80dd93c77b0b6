"""The inference service: FastAPI over an engine serving many adapters (see service/app.py)."""
