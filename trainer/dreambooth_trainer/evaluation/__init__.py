"""Evaluation: how well a trained model renders its subject, the DreamBooth paper's way.

`prompts` says what to generate, `run` generates it with the trained and the base pipeline and
scores both, `encoders` turns images and prompts into CLIP and DINO embeddings (from a hub id, a
local directory, s3:// or `random_encoders`), `metrics` reduces embeddings to the paper's numbers,
and `phase` is the evaluation phase of a job (what `dreambooth run` calls after export).
"""
