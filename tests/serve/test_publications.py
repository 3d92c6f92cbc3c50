"""The publication index (contract publication.py) and how the server reads it (publications.py):
a kubelet-style `..data` swap and an edit in place are both seen, a bad index keeps the last
good set, and per-model metric labels stay bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from dreambooth_contract import publication
from dreambooth_contract.publication import Publications, PublishedModel
from dreambooth_trainer.serve.metrics import OTHER_MODELS, ModelLabels
from dreambooth_trainer.serve.publications import PublicationSource, PublicationWatcher

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def index(**models: str) -> str:
    """An index of name=digest pairs (names with "/" given as "__")."""
    return publication.render(
        Publications(
            models=tuple(
                PublishedModel(name=name.replace("__", "/"), uri=f"s3://b/{name}", digest=digest)
                for name, digest in models.items()
            )
        )
    )


def kubelet_write(volume: Path, text: str, version: int) -> None:
    """What kubelet does on a ConfigMap update: a new timestamped directory, then an atomic
    swap of the `..data` symlink the file's own symlink points through."""
    target = volume / f"..2026_{version}"
    target.mkdir()
    (target / publication.PUBLICATIONS_FILE).write_text(text)
    staged = volume / "..data_tmp"
    staged.symlink_to(target.name)
    staged.replace(volume / "..data")
    link = volume / publication.PUBLICATIONS_FILE
    if not link.is_symlink():
        link.symlink_to(f"..data/{publication.PUBLICATIONS_FILE}")


def test_a_configmap_update_is_seen_through_the_data_symlink_swap(tmp_path):
    source = PublicationSource(tmp_path)
    assert source.refresh() is False and source.models == {}  # nothing published yet
    kubelet_write(tmp_path, index(ns__rex=DIGEST_A), 1)
    assert source.refresh() is True
    assert source.get("ns/rex").digest == DIGEST_A
    assert source.refresh() is False  # unchanged: not re-read
    # The same size as before: the swapped-in file (a new inode) tells the versions apart.
    kubelet_write(tmp_path, index(ns__rex=DIGEST_B), 2)
    assert source.refresh() is True
    assert source.get("ns/rex").digest == DIGEST_B
    kubelet_write(tmp_path, index(), 3)
    assert source.refresh() is True and source.models == {}


def test_an_edit_in_place_is_seen_and_a_bad_index_keeps_the_last_good_set(tmp_path):
    errors: list[str] = []
    source = PublicationSource(tmp_path, on_error=errors.append)
    path = tmp_path / publication.PUBLICATIONS_FILE
    path.write_text(index(ns__rex=DIGEST_A, ns__fido=DIGEST_B))
    assert source.refresh() is True
    path.write_text('{"format": "dreambooth-publications/v1", "models": [{"nam": "x"}]}')
    assert source.refresh() is False
    assert sorted(source.models) == ["ns/fido", "ns/rex"]
    assert len(errors) == 1
    path.unlink()  # a missing index: nothing is published
    assert source.refresh() is True and source.models == {}


def test_the_watcher_reports_changes(tmp_path):
    seen: list[list[str]] = []
    source = PublicationSource(tmp_path)
    watcher = PublicationWatcher(source, 3600, on_change=lambda m: seen.append(sorted(m)))
    (tmp_path / publication.PUBLICATIONS_FILE).write_text(index(ns__rex=DIGEST_A))
    watcher.start()
    try:
        assert seen == [["ns/rex"]]
        os.utime(tmp_path / publication.PUBLICATIONS_FILE, ns=(1, 1))  # same content
        watcher.poll()
        assert seen == [["ns/rex"]]  # re-read, but the set did not change
    finally:
        watcher.close()


def test_the_index_refuses_repeated_names_bad_digests_and_unknown_fields():
    model = {"name": "ns/rex", "uri": "s3://b/rex/export", "digest": DIGEST_A}
    with pytest.raises(ValidationError, match="repeated"):
        Publications.model_validate({"models": [model, model]})
    with pytest.raises(ValidationError, match="digest"):
        PublishedModel.model_validate({**model, "digest": "a" * 64})
    with pytest.raises(ValidationError, match="digets"):
        PublishedModel.model_validate({**model, "digets": DIGEST_A})
    assert publication.model_name("ns", "rex") == "ns/rex"


def test_render_is_the_same_bytes_for_the_same_set():
    assert index(ns__b=DIGEST_B, ns__a=DIGEST_A) == index(ns__a=DIGEST_A, ns__b=DIGEST_B)
    assert publication.parse(index(ns__a=DIGEST_A)).models[0].name == "ns/a"


def test_model_labels_are_bounded():
    label = ModelLabels(limit=2)
    assert [label("a"), label("b"), label("c"), label("a")] == ["a", "b", OTHER_MODELS, "a"]
