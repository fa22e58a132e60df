"""ood-serve: the OOD scoring service (FastAPI)."""
