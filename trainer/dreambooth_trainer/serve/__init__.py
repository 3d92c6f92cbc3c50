"""Inference server: an OpenAI-Images-compatible HTTP API over an exported DreamBooth pipeline.

Modules: schemas (wire format), batching (dynamic batcher), engine (diffusers calls),
artifact (fetch + digest verification + load), host (model lifecycle), app (FastAPI routes),
metrics (Prometheus), cli (`dreambooth serve`).
"""
