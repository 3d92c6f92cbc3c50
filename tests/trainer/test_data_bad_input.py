"""Bad input fails at once as bad input (exit 2, InvalidConfig), naming the input; never exit 1.

Exit 1 means "failed while running" and costs a gang restart (runPolicy.backoffLimit of them);
a corrupt photo, a decompression bomb, an s3:// URI that storage refuses or a corrupt class-image
manifest would fail the same way on every restart.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from dreambooth_contract import env
from dreambooth_contract.env import EXIT_BAD_INPUT
from dreambooth_contract.trainer_config import ConfigError, TrainerConfig
from dreambooth_operator.cli import main
from dreambooth_trainer import cli as trainer_cli
from dreambooth_trainer import data, dataset_check, priors
from dreambooth_trainer.local import load_config
from dreambooth_trainer.storage import LocalStore, open_store

from .conftest import REPO, SUBJECT_DIR

pytestmark = pytest.mark.trainer

EXAMPLE = REPO / "examples" / "local-tiny.yaml"


# -- images ----------------------------------------------------------------------------------------


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG of a few bytes whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a picture\n" * 10)
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated_jpeg(path: Path) -> Path:
    whole = (SUBJECT_DIR / "beach.jpg").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def broken_png(path: Path) -> Path:
    """A real PNG with one byte of its pixel data flipped (its CRC no longer matches)."""
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    raw = bytearray(path.read_bytes())
    idat = raw.index(b"IDAT")
    raw[idat + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


BAD_IMAGES = {
    "not-an-image": (garbage, "dog.png", "is not a readable image"),
    "empty-file": (empty, "dog.jpg", "is not a readable image"),
    "truncated-jpeg": (truncated_jpeg, "dog.jpg", "is not a readable image"),
    "corrupt-png": (broken_png, "dog.png", "is not a readable image"),
    # 81 megapixels: under PIL's own warning threshold (89.5), over ours
    "bomb-81-megapixels": (lambda p: png_claiming(p, 9000, 9000), "dog.png", "megapixels"),
    # 100 megapixels: PIL warns (DecompressionBombWarning), which must count as an error
    "bomb-100-megapixels": (lambda p: png_claiming(p, 10000, 10000), "dog.png", "megapixels"),
    # 400 megapixels: PIL itself raises DecompressionBombError
    "bomb-400-megapixels": (lambda p: png_claiming(p, 20000, 20000), "dog.png", "megapixels"),
}


@pytest.fixture
def subject_with(tmp_path: Path):
    """The example subject plus one bad file."""

    def make(write, name: str) -> Path:
        directory = tmp_path / "subject"
        shutil.copytree(SUBJECT_DIR, directory)
        write(directory / name)
        return directory

    return make


@pytest.mark.parametrize(
    ("write", "name", "problem"), list(BAD_IMAGES.values()), ids=list(BAD_IMAGES)
)
def test_a_bad_subject_image_is_bad_input_naming_the_field_and_the_file(
    make_config, subject_with, write, name: str, problem: str
):
    config = make_config({"priorPreservation": {"enabled": False}})
    directory = subject_with(write, name)
    # Images are decoded before the VAE is first used: no model is needed to refuse them.
    with pytest.raises(ConfigError) as raised:
        data.build_data(config, None, None, None, [directory], [])
    assert raised.value.field == "instance.imagesUri"
    assert name in raised.value.message and problem in raised.value.message
    assert str(raised.value).startswith(f"instance.imagesUri: {name} ")


def test_the_pixel_limit_is_one_documented_constant(make_config, tmp_path: Path, monkeypatch):
    assert dataset_check.MAX_IMAGE_PIXELS == 64_000_000
    monkeypatch.setattr(dataset_check, "MAX_IMAGE_PIXELS", 64 * 64)
    Image.new("RGB", (64, 64)).save(tmp_path / "at-the-limit.png")
    assert data.load_rgb(tmp_path / "at-the-limit.png", "instance.imagesUri").size == (64, 64)
    Image.new("RGB", (65, 64)).save(tmp_path / "over-the-limit.png")
    with pytest.raises(ConfigError, match=r"over-the-limit\.png is 65x64 pixels"):
        data.load_rgb(tmp_path / "over-the-limit.png", "instance.imagesUri")


def test_a_corrupt_class_image_is_bad_input_that_says_to_delete_the_set(
    make_config, tiny_pipeline, tmp_path: Path
):
    config = make_config()
    class_dir = tmp_path / "priors"
    class_dir.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (index * 60, 0, 0)).save(class_dir / priors.image_name(index))
    garbage(class_dir / priors.image_name(3))
    with pytest.raises(ConfigError) as raised:
        data.build_data(
            config,
            tiny_pipeline.vae,
            tiny_pipeline.tokenizer,
            tiny_pipeline.text_encoder,
            [SUBJECT_DIR],
            [class_dir],
        )
    assert raised.value.field == "storage.priorCacheUri"
    assert "class-000003.png is not a readable image" in raised.value.message
    assert "delete" in raised.value.message


@pytest.fixture(autouse=True)
def model_cache(shared_dir: Path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(shared_dir / "models"))


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv(env.TERMINATION_LOG_ENV, str(path))
    # `train` ends with os._exit (cli.exit_without_teardown); in this process a plain exit.
    monkeypatch.setattr(trainer_cli, "exit_without_teardown", sys.exit)
    return path


def example_config(tmp_path: Path, **changes) -> dict:
    config = json.loads(load_config(EXAMPLE, tmp_path / "out").to_json())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def run(command: str, config: dict, tmp_path: Path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    return CliRunner().invoke(main, [command, "--config", str(config_file)])


def assert_bad_input(result, termination_log: Path, *expected: str) -> None:
    assert result.exit_code == EXIT_BAD_INPUT, (result.output, result.exception)
    message = termination_log.read_text()
    assert message.startswith(env.BAD_INPUT_PREFIX), message
    for text in expected:
        assert text in message and text in result.output, (text, message)


def test_train_exits_2_on_a_corrupt_subject_image(tmp_path: Path, subject_with, termination_log):
    directory = subject_with(truncated_jpeg, "dog.jpg")
    config = example_config(
        tmp_path, instance__imagesUri=str(directory), priorPreservation__enabled=False
    )
    result = run("train", config, tmp_path)
    assert_bad_input(result, termination_log, "instance.imagesUri: dog.jpg is not a readable image")
    assert not (tmp_path / "out" / "trained").exists()


# -- URIs that storage refuses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "uri"),
    [
        ("instance.imagesUri", "s3://subjects/dog/../cat/"),
        ("outputUri", "s3://runs/local-tiny/.."),
        ("priorCacheUri", "s3://runs/./priors"),
    ],
)
def test_train_exits_2_on_an_s3_uri_with_dot_segments(
    tmp_path: Path, termination_log, field: str, uri: str
):
    config = example_config(tmp_path, priorPreservation__enabled=False)
    *section, name = field.split(".")
    (config[section[0]] if section else config)[name] = uri
    result = run("train", config, tmp_path)
    assert_bad_input(result, termination_log, field, "'..' path segments are not allowed")


@pytest.mark.parametrize("uri", ["s3://runs/a/../b", "s3://runs/./b", "gs://runs/b", "s3:///b"])
def test_a_uri_the_storage_refuses_is_bad_input(uri: str, termination_log):
    with pytest.raises(SystemExit) as exited, trainer_cli.input_errors():
        open_store(uri)
    assert exited.value.code == EXIT_BAD_INPUT
    message = termination_log.read_text()
    assert message.startswith(env.BAD_INPUT_PREFIX) and uri in message


# -- the class-image manifest ----------------------------------------------------------------------


@pytest.fixture
def priors_set(make_config, tmp_path: Path):
    """A complete, committed set of 3 class images in a cache of this test's own."""
    config = make_config({"priorPreservation": {"numClassImages": 3}})
    config = config.model_copy(update={"prior_cache_uri": str(tmp_path / "cache")})
    store = LocalStore(config.priors_uri)
    request = priors.PriorRequest.from_config(config)
    store.path("").mkdir(parents=True)
    for index in range(request.count):
        Image.new("RGB", (64, 64)).save(store.path(priors.image_name(index)))
    assert priors.commit_if_complete(store, request)
    return config, store, request


def test_a_set_without_a_manifest_is_not_complete_and_not_an_error(priors_set):
    _, store, request = priors_set
    store.delete(priors.MANIFEST)
    assert not priors.is_complete(store, request)  # not generated yet (or a shard is at it)


def test_a_committed_set_is_complete(priors_set):
    _, store, request = priors_set
    assert priors.is_complete(store, request)


def corrupt_manifests(request: priors.PriorRequest) -> dict[str, object]:
    good = {
        "format": "dreambooth-priors/v1",
        "key": request.key,
        "params": request.params,
        "images": [{"path": priors.image_name(i), "sha256": "0" * 64} for i in range(3)],
    }
    return {
        "not-json": b'{"key": "abc", "images": [',
        "not-utf8": b"\xff\xfe\x00",
        "not-an-object": b"[]",
        "another-key": {**good, "key": "0" * 32},
        "another-format": {**good, "format": "dreambooth-priors/v0"},
        "no-images": {k: v for k, v in good.items() if k != "images"},
        "too-few-images": {**good, "images": good["images"][:2]},
        "wrong-names": {**good, "images": [{**e, "path": "x.png"} for e in good["images"]]},
        "entry-not-an-object": {**good, "images": ["class-000000.png", *good["images"][1:]]},
    }


CORRUPT = [
    "not-json",
    "not-utf8",
    "not-an-object",
    "another-key",
    "another-format",
    "no-images",
    "too-few-images",
    "wrong-names",
    "entry-not-an-object",
]


@pytest.mark.parametrize("kind", CORRUPT)
def test_a_corrupt_manifest_is_bad_input_that_says_to_delete_the_set(priors_set, kind: str):
    _, store, request = priors_set
    content = corrupt_manifests(request)[kind]
    store.write_bytes(
        priors.MANIFEST, content if isinstance(content, bytes) else json.dumps(content).encode()
    )
    with pytest.raises(ConfigError) as raised:
        priors.is_complete(store, request)
    assert raised.value.field == "storage.priorCacheUri"
    assert store.uri_for(priors.MANIFEST) in raised.value.message
    assert f"delete {store.uri}" in raised.value.message


def test_a_manifest_listing_a_missing_image_is_bad_input(priors_set):
    _, store, request = priors_set
    store.delete(priors.image_name(1))
    with pytest.raises(ConfigError, match=r"class-000001\.png.*missing") as raised:
        priors.is_complete(store, request)
    assert f"delete {store.uri}" in raised.value.message


@pytest.mark.parametrize("command", ["priors", "train"])
def test_priors_and_train_exit_2_on_a_corrupt_manifest(
    tmp_path: Path, termination_log, command: str
):
    config = example_config(tmp_path)
    store = LocalStore(TrainerConfig.model_validate(config).priors_uri)
    store.write_bytes(priors.MANIFEST, b"{truncated")
    result = run(command, config, tmp_path)
    assert_bad_input(
        result, termination_log, "storage.priorCacheUri", store.uri_for(priors.MANIFEST)
    )
    assert f"delete {store.uri}" in termination_log.read_text()
