"""instance.captions: each photo trains with its own caption (NAME.txt, metadata.jsonl)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dreambooth_contract.trainer_config import ConfigError
from dreambooth_trainer import data, priors
from dreambooth_trainer.captions import prompt_for, read_captions
from dreambooth_trainer.parallel.base import World
from dreambooth_trainer.train import build_trainer

from .conftest import CLASS_PROMPT, INSTANCE_PROMPT, SUBJECT_DIR

pytestmark = pytest.mark.trainer

FIELD = "instance.imagesUri"


@pytest.fixture
def captioned(tmp_path) -> Path:
    """The example subject (beach, grass, sky, table) with two captions in both conventions."""
    directory = Path(shutil.copytree(SUBJECT_DIR, tmp_path / "subject"))
    (directory / "beach.txt").write_text("on the beach\n")
    line = {"file_name": "grass.jpg", "text": "lying on the grass"}
    (directory / "metadata.jsonl").write_text(json.dumps(line) + "\n\n")
    return directory


def test_both_conventions_are_read(captioned):
    images = data.list_images(captioned)
    assert read_captions(captioned, images, FIELD) == {
        "beach.jpg": "on the beach",
        "grass.jpg": "lying on the grass",
    }


def test_the_mode_decides_what_a_caption_does():
    assert prompt_for("a photo of sks dog", "on a sofa", "append") == (
        "a photo of sks dog, on a sofa"
    )
    assert prompt_for("a photo of sks dog", "sks dog on a sofa", "replace") == "sks dog on a sofa"
    assert prompt_for("a photo of sks dog", "on a sofa", "ignore") == "a photo of sks dog"
    assert prompt_for("a photo of sks dog", None, "replace") == "a photo of sks dog"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"moon.txt": "on the moon"}, "moon.txt is a caption without a photo"),
        (
            {"metadata.jsonl": '{"file_name": "moon.jpg", "text": "x"}'},
            "metadata.jsonl line 1 captions moon.jpg, which is not among the photos",
        ),
        (
            {"sky.txt": "a", "metadata.jsonl": '{"file_name": "sky.jpg", "text": "b"}'},
            "sky.jpg has two captions",
        ),
        ({"metadata.jsonl": "\n{not json"}, "metadata.jsonl line 2 is not JSON"),
        ({"metadata.jsonl": '{"file_name": "sky.jpg"}'}, 'line 1 needs "file_name" and "text"'),
        ({"sky.txt": "x" * 20_000}, "sky.txt is over 16384 bytes"),
    ],
)
def test_bad_captions_name_the_field_and_the_file(tmp_path, files, message):
    directory = Path(shutil.copytree(SUBJECT_DIR, tmp_path / "subject"))
    for name, text in files.items():
        (directory / name).write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_captions(directory, data.list_images(directory), FIELD)
    assert refused.value.field == FIELD
    assert message in str(refused.value)


def trainer_with(make_config, subject: Path, captions: str, training: dict | None = None):
    config = make_config({"instance": {"captions": captions}, "training": training or {}})
    return build_trainer(config, subject, priors.run_priors(config), World())


@pytest.mark.parametrize("cache", [True, False])
def test_each_photo_trains_with_its_own_caption(make_config, captioned, cache):
    trainer = trainer_with(make_config, captioned, "append", {"cacheTextEmbeddings": cache})
    dataset = trainer.data
    beach, grass = (f"{INSTANCE_PROMPT}, {c}" for c in ("on the beach", "lying on the grass"))
    if cache:  # one embedding per distinct prompt: two captioned, two plain photos, the class
        assert dataset.prompts.cached is not None and len(dataset.prompts.cached) == 4
    photos = [path.name for path in data.list_images(captioned)]
    expected = {"beach.jpg": beach, "grass.jpg": grass}
    encoder, tokenizer = trainer.frozen.text_encoder, trainer.frozen.tokenizer
    seen = set()
    for step in range(8):  # every photo comes up within two epochs of four
        batch = dataset.batch(step, 1, 0, 1, torch.Generator().manual_seed(step))
        photo = photos[dataset.instance.order.take(step, 1)[0]]
        seen.add(photo)
        rows = [expected.get(photo, INSTANCE_PROMPT), CLASS_PROMPT]
        alone = torch.cat(
            [data.encode_prompt(encoder, data.tokenize(tokenizer, [p])) for p in rows]
        )
        torch.testing.assert_close(batch.condition, alone, rtol=1e-5, atol=1e-5)
    assert seen == set(photos)


@pytest.mark.parametrize(
    ("captions", "instance_prompts"),
    [
        ("replace", ["on the beach", "lying on the grass", INSTANCE_PROMPT]),
        ("ignore", [INSTANCE_PROMPT]),
    ],
)
def test_replace_and_ignore(make_config, captioned, captions, instance_prompts):
    trainer = trainer_with(make_config, captioned, captions, {"trainTextEncoder": True})
    # With the text encoder training, the prompts stay token ids: compare those.
    expected = data.tokenize(trainer.frozen.tokenizer, [*instance_prompts, CLASS_PROMPT])
    assert torch.equal(trainer.data.prompts.ids, expected)
