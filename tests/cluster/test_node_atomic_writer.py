"""Unit tests of the test node's atomic writer, kubelet's layout of configMap and similar volumes
(no control plane needed)."""

from __future__ import annotations

import json
import os
import re
import stat
import threading

import pytest

from tests.support.node.atomic_writer import DATA_LINK, current_version, write_atomically
from tests.support.procs import wait_for

INDEX = "publications.json"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_are_symlinks_through_data_to_a_timestamped_version(tmp_path):
    files = {INDEX: (b"{}", 0o644), "conf/a.txt": (b"a", 0o600)}
    assert write_atomically(tmp_path, files)
    version = os.readlink(tmp_path / DATA_LINK)
    assert re.fullmatch(r"\.\.\d{4}(_\d\d){5}\.\w+", version)  # ..2024_01_31_12_00_00.<random>
    assert sorted(os.listdir(tmp_path)) == sorted([DATA_LINK, version, INDEX, "conf"])
    assert os.readlink(tmp_path / INDEX) == f"{DATA_LINK}/{INDEX}"
    assert os.readlink(tmp_path / "conf") == f"{DATA_LINK}/conf"
    assert (tmp_path / INDEX).read_bytes() == b"{}"
    assert (tmp_path / "conf" / "a.txt").read_bytes() == b"a"
    assert _mode(tmp_path / INDEX) == 0o644 and _mode(tmp_path / "conf" / "a.txt") == 0o600
    assert _mode(tmp_path / version) == 0o755


def test_the_same_content_is_not_written_again(tmp_path):
    files = {INDEX: (b"[1]", 0o644)}
    write_atomically(tmp_path, files)
    version, inode = current_version(tmp_path), os.stat(tmp_path / INDEX).st_ino
    assert not write_atomically(tmp_path, dict(files))
    assert current_version(tmp_path) == version and os.stat(tmp_path / INDEX).st_ino == inode
    assert write_atomically(tmp_path, {INDEX: (b"[1]", 0o600)})  # a new mode is a change
    assert _mode(tmp_path / INDEX) == 0o600


def test_a_new_version_replaces_keys_and_the_old_version(tmp_path):
    write_atomically(tmp_path, {"a": (b"1", None), "gone": (b"1", None), "dir/x": (b"1", None)})
    old = current_version(tmp_path)
    old_inode = os.stat(tmp_path / "a").st_ino
    assert write_atomically(tmp_path, {"a": (b"2", None), "new": (b"2", None)})
    new = current_version(tmp_path)
    assert new != old and not old.exists()
    assert (tmp_path / "a").read_bytes() == b"2" and (tmp_path / "new").read_bytes() == b"2"
    assert os.stat(tmp_path / "a").st_ino != old_inode  # what a reader polling os.stat sees
    assert not os.path.lexists(tmp_path / "gone") and not os.path.lexists(tmp_path / "dir")
    assert sorted(os.listdir(tmp_path)) == sorted([DATA_LINK, new.name, "a", "new"])


def test_no_files_leave_an_empty_volume(tmp_path):
    write_atomically(tmp_path, {"a": (b"1", None)})
    assert write_atomically(tmp_path, {})  # an optional ConfigMap that has gone
    assert sorted(os.listdir(tmp_path)) == sorted([DATA_LINK, current_version(tmp_path).name])


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "..data", "..x/y"])
def test_paths_outside_the_volume_or_clashing_with_its_links_are_refused(tmp_path, path):
    with pytest.raises(ValueError, match="invalid volume file path"):
        write_atomically(tmp_path / "volume", {path: (b"", None)})


class _Reader(threading.Thread):
    """Reads the index as a server does (stat, then read) in a tight loop; notes the versions it
    read and every read that found the file missing or not a whole version."""

    def __init__(self, path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.versions_seen: set[int] = set()
        self.problems: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                os.stat(self.path)
                text = self.path.read_text()
                self.versions_seen.add(json.loads(text)["version"])
            except (OSError, ValueError) as exc:
                self.problems.append(repr(exc)[:200])


def test_a_reader_never_sees_the_file_missing_or_half_written_during_swaps(tmp_path):
    versions = 30
    pad = "x" * 300_000  # big enough that a write in place would be seen half done

    def payload(version: int):
        return {INDEX: (json.dumps({"version": version, "pad": pad}).encode(), 0o644)}

    write_atomically(tmp_path, payload(0))
    reader = _Reader(tmp_path / INDEX)
    reader.start()
    try:
        wait_for("version 0 read", lambda: 0 in reader.versions_seen, 30)
        for version in range(1, versions):
            write_atomically(tmp_path, payload(version))
            # the reader reads on until it has this version: no assumption about its speed
            wait_for(f"version {version} read", lambda v=version: v in reader.versions_seen, 30)
    finally:
        reader.stop.set()
        reader.join(30)
    assert reader.problems == []
    assert reader.versions_seen == set(range(versions))
