"""Inference engines: plain torch, no ray/fastapi/pydantic."""
