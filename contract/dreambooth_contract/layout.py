"""Where a job's files lie, relative to storage.outputUri, and how their URIs are joined.

    <outputUri>/
      checkpoints/      committed training checkpoints (the trainer's checkpoint manager)
      trained/          the trained weights the export starts from
      export/           the artifact: manifest.json, single files and pipeline/ (diffusers)
      samples/          sample grids rendered during training, and final.png
      evaluation/       report.json and grid.png: the trained and the base model's scores
      logs/             TensorBoard event files
    <outputUri>/../priors/<key>/   the class images, by default (storage.priorCacheUri)

The same for a local directory and an s3:// prefix.
"""

from __future__ import annotations

CHECKPOINTS_DIR = "checkpoints"
TRAINED_DIR = "trained"
EXPORT_DIR = "export"
PIPELINE_DIR = "pipeline"  # inside EXPORT_DIR
SAMPLES_DIR = "samples"
EVALUATION_DIR = "evaluation"
EVALUATION_REPORT = "report.json"  # inside EVALUATION_DIR
EVALUATION_GRID = "grid.png"  # inside EVALUATION_DIR
LOGS_DIR = "logs"
PRIORS_DIR = "priors"  # beside the output location, unless storage.priorCacheUri says otherwise


def join_uri(base: str, *parts: str) -> str:
    """`base` and `parts` joined by single slashes; empty parts are dropped.

    `base` keeps its scheme (s3://bucket) or leading slash; it may be "" to join bare keys.
    """
    tail = [part.strip("/") for part in parts if part.strip("/")]
    head = [base.rstrip("/")] if base else []
    return "/".join(head + tail)
