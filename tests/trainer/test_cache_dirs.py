"""Processes of a pod fill the shared model cache at once without breaking each other."""

from __future__ import annotations

import threading
from pathlib import Path

from dreambooth_trainer.cache_dirs import build_once

FILES = ("part-1", "part-2", "done")


def test_a_racing_builder_never_touches_another_ones_unfinished_copy(tmp_path: Path):
    target = tmp_path / "model"
    slow_started, fast_done = threading.Event(), threading.Event()

    def slow(directory: Path) -> None:
        (directory / "part-1").write_text("slow")
        slow_started.set()
        assert fast_done.wait(10)
        for name in FILES[1:]:  # the old code had deleted this directory by now
            (directory / name).write_text("slow")

    def fast(directory: Path) -> None:
        for name in FILES:
            (directory / name).write_text("fast")

    errors: list[BaseException] = []

    def slow_builder() -> None:
        try:
            build_once(target, slow, "done")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    slow_thread = threading.Thread(target=slow_builder)
    slow_thread.start()
    assert slow_started.wait(10)
    assert build_once(target, fast, "done") == target
    fast_done.set()
    slow_thread.join(30)
    assert not slow_thread.is_alive(), "the slow builder hangs"
    if errors:
        raise errors[0]
    assert {p.name: p.read_text() for p in target.iterdir()} == dict.fromkeys(FILES, "fast")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no private copy left behind


def test_a_complete_directory_is_not_built_again_and_a_partial_one_is(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "part-1").write_text("interrupted")

    def build(directory: Path) -> None:
        for name in FILES:
            (directory / name).write_text("new")

    build_once(target, build, "done")
    assert sorted(p.name for p in target.iterdir()) == sorted(FILES)
    assert (target / "part-1").read_text() == "new"

    def never(directory: Path) -> None:
        raise AssertionError("a complete directory was built again")

    build_once(target, never, "done")
