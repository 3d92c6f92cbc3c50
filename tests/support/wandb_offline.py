"""Reading back what W&B logged offline: the records of a run's `run-<id>.wandb` file.

wandb (0.20 and later) writes and reads this file in its Go core and ships no Python reader, so
the tests read its documented framing here: the LevelDB log format (32 KiB blocks of records,
each with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) behind a 7-byte file
header (":W&B", magic, version). Each record is a `wandb_internal_pb2.Record` (wandb's own
protobuf classes parse it).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(data: bytes) -> list[bytes]:
    ident, _, _ = FILE_HEADER.unpack_from(data)
    assert ident == b":W&B", ident
    out, pending, offset = [], b"", FILE_HEADER.size
    while offset + RECORD_HEADER.size <= len(data):
        left = BLOCK - offset % BLOCK
        if left < RECORD_HEADER.size:  # the block's zero-filled tail
            offset += left
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, offset)
        if kind == 0:  # zero padding: the rest of the block is empty
            offset += left
            continue
        start = offset + RECORD_HEADER.size
        chunk, offset = data[start : start + length], start + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            out.append(pending)
    return out


@dataclass
class OfflineRun:
    """What one offline run directory holds: history rows, summary, run identity, media."""

    directory: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    job_type: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[Path]:
        return sorted((self.directory / "files" / "media" / "images").rglob("*.png"))


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(directory: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    (path,) = directory.glob("run-*.wandb")
    run = OfflineRun(directory)
    for payload in payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
        elif kind == "run":
            info = record.run
            run.run_id, run.project, run.name = info.run_id, info.project, info.display_name
            run.job_type = info.job_type
    return run


def read_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under a `wandb` directory, oldest first."""
    return [read_run(d) for d in sorted(wandb_dir.glob("offline-run-*"))]
