"""Per-photo captions, in the two conventions users bring them in.

- a sidecar NAME.txt beside NAME.jpg (kohya's sd-scripts);
- metadata.jsonl, one JSON object per line with "file_name" and "text" (Hugging Face datasets'
  imagefolder).

A photo gets at most one caption. A caption that names no photo in the directory is bad input:
it is most likely a photo that was renamed or left behind, and training without it would
quietly lose a caption the user wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from dreambooth_contract.trainer_config import ConfigError

METADATA = "metadata.jsonl"
SIDECAR_SUFFIX = ".txt"
# A caption is one prompt (CLIP reads 77 tokens); a larger file is not a caption.
MAX_CAPTION_BYTES = 16_384


def read_captions(directory: Path, images: Iterable[Path], field: str) -> dict[str, str]:
    """Caption by image file name; ConfigError naming `field` for a caption without a photo,
    two captions for one photo, or a metadata line that is not a caption."""
    images = list(images)
    captions = _sidecars(directory, images, field)
    metadata = directory / METADATA
    if metadata.is_file():
        names = {image.name for image in images}
        for number, name, text in _metadata_lines(metadata, field):
            if name not in names:
                raise ConfigError(
                    field,
                    f"{METADATA} line {number} captions {name}, which is not among the photos: "
                    "add the photo or remove the line",
                )
            if name in captions:
                raise ConfigError(
                    field,
                    f"{name} has two captions ({METADATA} line {number} and another): keep one",
                )
            if text:
                captions[name] = text
    return captions


def prompt_for(prompt: str, caption: str | None, mode: str) -> str:
    """The prompt a photo trains with: instance.captions decides (append, replace, ignore)."""
    if caption is None or mode == "ignore":
        return prompt
    if mode == "replace":
        return caption
    return f"{prompt}, {caption}"


def _sidecars(directory: Path, images: list[Path], field: str) -> dict[str, str]:
    by_stem: dict[str, list[str]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image.name)
    captions: dict[str, str] = {}
    for sidecar in sorted(directory.glob("*" + SIDECAR_SUFFIX)):
        owners = by_stem.get(sidecar.stem, [])
        if not owners:
            raise ConfigError(
                field,
                f"{sidecar.name} is a caption without a photo (no {sidecar.stem}.jpg, .png, "
                "...): add the photo or remove the caption",
            )
        if len(owners) > 1:
            raise ConfigError(
                field, f"{sidecar.name} could caption {' or '.join(owners)}: rename one photo"
            )
        text = _read_text(sidecar, field).strip()
        if text:
            captions[owners[0]] = text
    return captions


def _metadata_lines(path: Path, field: str) -> Iterable[tuple[int, str, str]]:
    """(line number, file_name, text) of each non-blank line."""
    for number, line in enumerate(_read_text(path, field, limit=None).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(field, f"{METADATA} line {number} is not JSON") from None
        name, text = (
            entry.get(k) if isinstance(entry, dict) else None for k in ("file_name", "text")
        )
        if not isinstance(name, str) or not isinstance(text, str):
            raise ConfigError(
                field, f'{METADATA} line {number} needs "file_name" and "text", both strings'
            )
        yield number, name, text.strip()


def _read_text(path: Path, field: str, limit: int | None = MAX_CAPTION_BYTES) -> str:
    if limit is not None and path.stat().st_size > limit:
        raise ConfigError(field, f"{path.name} is over {limit} bytes: a caption is one prompt")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(field, f"{path.name} is not UTF-8 text") from None
