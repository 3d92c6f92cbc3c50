"""`dreambooth validate` names the field of every bad dataset: the spec's rules between
subjects, and a look at local photos, captions and class images (s3:// ones are checked when a
phase loads them)."""

from __future__ import annotations

import copy
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from dreambooth_operator.cli import main

ROOT = Path(__file__).resolve().parents[2]
CUBE = ROOT / "examples" / "local" / "subject"

JOB: dict[str, Any] = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "DreamBoothJob",
    "metadata": {"name": "two"},
    "spec": {
        "baseModel": {"uri": "random://tiny-sd"},
        "subjects": [
            {"imagesUri": "cube", "prompt": "a photo of sks cube", "classPrompt": "a cube"},
            {"imagesUri": "ball", "prompt": "a photo of zwx ball", "classPrompt": "a ball"},
        ],
        "training": {"batchSize": 2, "mixedPrecision": "no", "resolution": 64},
        "resources": {"gpusPerNode": 0, "processesPerNode": 1},
        "storage": {"outputUri": "out"},
    },
}


def photos(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (80, 64), (40 * i, 90, 200)).save(directory / f"p{i}.png")
    return directory


def truncated_jpeg(path: Path) -> None:
    whole = (CUBE / "beach.jpg").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"not a picture\n" * 8)


def decompression_bomb(path: Path) -> None:
    """A PNG of a few bytes whose header claims 20000 x 20000 pixels (beyond PIL's own limit)."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", header), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")]
    png = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in chunks
    )
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def subject(index: int, **changes) -> Callable[[dict, Path], None]:
    def change(spec: dict, base: Path) -> None:
        spec["subjects"][index].update(changes)

    return change


def in_dir(name: str, make: Callable[[Path], None]) -> Callable[[dict, Path], None]:
    return lambda spec, base: make(base / name)


def single(spec: dict, base: Path) -> None:
    """The one-subject form, with its photos in empty/."""
    (base / "empty").mkdir()
    first = spec.pop("subjects")[0]
    spec["instance"] = {"imagesUri": "empty", "prompt": first["prompt"]}
    spec["priorPreservation"] = {"classPrompt": first["classPrompt"]}


def own_class_images(make: Callable[[Path], None]) -> Callable[[dict, Path], None]:
    def change(spec: dict, base: Path) -> None:
        (base / "regularization").mkdir()
        make(base / "regularization")
        for each in spec["subjects"]:
            each["classImagesUri"] = "regularization" if each["classPrompt"] == "a ball" else None

    return change


BAD: dict[str, tuple[list[Callable[[dict, Path], None]], str]] = {
    "no-images": ([in_dir("ball", lambda d: [p.unlink() for p in d.glob("*.png")])],
                  "spec.subjects[1].imagesUri: no images (png, jpg, webp) in"),
    "missing-directory": ([subject(1, imagesUri="nowhere")],
                          "spec.subjects[1].imagesUri: no images (png, jpg, webp) in"),
    "unreadable-image": ([in_dir("ball/bad.png", garbage)],
                         "spec.subjects[1].imagesUri: bad.png is not a readable image"),
    "decompression-bomb": ([in_dir("ball/huge.png", decompression_bomb)],
                           "spec.subjects[1].imagesUri: huge.png has more than the 64 megapixels"),
    "truncated-jpeg": ([in_dir("cube/half.jpg", truncated_jpeg)],
                       "spec.subjects[0].imagesUri: half.jpg is not a readable image"),
    "caption-without-photo": ([in_dir("cube/gone.txt", lambda p: p.write_text("a caption"))],
                              "spec.subjects[0].imagesUri: gone.txt is a caption without a "
                              "photo"),
    "more-subjects-than-the-batch": (
        [lambda spec, base: spec["training"].update(batchSize=1)],
        "spec.training.batchSize: must be at least the number of subjects (2)"),
    "the-same-rare-token": ([subject(1, prompt="a photo of sks ball")],
                            "spec.subjects[1].prompt: does not tell it from subjects[0]"),
    "identical-prompts": ([subject(1, prompt="a photo of sks cube", classPrompt="a cube")],
                          "spec.subjects[1].prompt: does not tell it from subjects[0]"),
    "the-same-name": ([subject(0, name="toy"), subject(1, name="toy")],
                      "spec.subjects[1].name: 'toy' is subjects[0]'s label already"),
    "a-name-that-is-another-subjects-index": (
        [subject(1, name="0")], "spec.subjects[1].name: '0' is subjects[0]'s label already"),
    "one-class-two-spellings": (
        [subject(1, prompt="a zwx Cube", classPrompt="a  Cube")],
        "spec.subjects[1].classPrompt: is subjects[0].classPrompt written another way"),
    "no-identifier": ([subject(1, prompt="a ball")],
                      "spec.subjects[1].prompt: has no word beyond its classPrompt"),
    "own-class-images-none": ([own_class_images(lambda d: None)],
                              "spec.subjects[1].classImagesUri: no images"),
    "own-class-images-unreadable": (
        [own_class_images(lambda d: garbage(d / "x.jpg"))],
        "spec.subjects[1].classImagesUri: x.jpg is not a readable image"),
    "one-subject-no-images": ([single], "spec.instance.imagesUri: no images"),
}  # fmt: skip


def validate(tmp_path: Path, changes: list[Callable[[dict, Path], None]]):
    photos(tmp_path / "ball")
    photos(tmp_path / "cube")
    job = copy.deepcopy(JOB)
    for change in changes:
        change(job["spec"], tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, CliRunner().invoke(main, ["validate", str(path)])


@pytest.mark.parametrize("case", list(BAD))
def test_validate_names_the_field_of_each_bad_dataset(tmp_path: Path, case: str):
    changes, expected = BAD[case]
    path, result = validate(tmp_path, changes)
    assert result.exit_code == 1, result.output
    assert f"{path}: {expected}" in result.output, result.output


def test_validate_accepts_good_local_datasets_and_leaves_s3_ones_to_the_phases(tmp_path: Path):
    path, result = validate(tmp_path, [subject(1, imagesUri="s3://bucket/ball")])
    assert result.exit_code == 0, result.output
    assert f"{path}: ok: DreamBoothJob two" in result.output
