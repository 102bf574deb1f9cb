"""FastAPI model server for the registry's champion (see ``serving.app``)."""
