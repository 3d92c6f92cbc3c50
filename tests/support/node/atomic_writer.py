"""Kubelet's atomic writer, which lays out configMap, secret, downwardAPI and projected volumes.

Each version of a volume's files goes into a fresh directory ``..<UTC timestamp>.<random>`` in the
volume; ``..data`` is a symlink to the current one, swapped by a single rename (``os.replace`` of
a temporary symlink ``..data_tmp``), and each top-level file or directory of the volume is a
symlink through it (``KEY -> ..data/KEY``). A reader that opens ``KEY`` gets one whole version,
the old or the new one, never a half-written or a missing file; code that stats ``KEY`` sees a
new inode after each swap. Same steps as kubernetes' pkg/volume/util/atomic_writer.go.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

DATA_LINK = "..data"
DATA_LINK_TMP = "..data_tmp"
VERSION_DIR_MODE = 0o755  # kubelet's, whatever the umask

# a volume's files: relative path -> (bytes, mode); mode None: the default umask
Files = dict[str, tuple[bytes, int | None]]


def write_atomically(directory: Path, files: Files) -> bool:
    """Make `files` the content of the volume at `directory`; False, writing nothing, when it
    holds exactly them already (same paths, bytes and modes)."""
    for relative in files:
        _check_path(relative)
    directory.mkdir(parents=True, exist_ok=True)
    old_version = current_version(directory)
    if old_version is not None and _holds(old_version, files):
        return False
    new_version = _new_version_dir(directory)
    _write_version(new_version, files)
    top_level = {PurePosixPath(relative).parts[0] for relative in files}
    for name in top_level:
        _link_through_data(directory, name)
    _swap_data_link(directory, new_version)
    if old_version is not None:
        for name in set(os.listdir(old_version)) - top_level:
            _remove_user_visible(directory / name)
        shutil.rmtree(old_version, ignore_errors=True)
    return True


def current_version(directory: Path) -> Path | None:
    """The directory ``..data`` points at, or None before the first write."""
    try:
        target = os.readlink(directory / DATA_LINK)
    except FileNotFoundError:
        return None
    version = directory / target
    return version if version.is_dir() else None


def _check_path(relative: str) -> None:
    """Kubelet's rule: relative, no ``..`` element, and not starting with ``..`` (which would
    clash with ``..data`` and the version directories)."""
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts or relative.startswith(".."):
        raise ValueError(f"invalid volume file path {relative!r}")


def _holds(version: Path, files: Files) -> bool:
    on_disk = {
        path.relative_to(version).as_posix(): path
        for path in version.rglob("*")
        if path.is_file() and not path.is_symlink()
    }
    if set(on_disk) != {PurePosixPath(relative).as_posix() for relative in files}:
        return False
    for relative, (data, mode) in files.items():
        path = on_disk[PurePosixPath(relative).as_posix()]
        if mode is not None and path.stat().st_mode & 0o777 != mode & 0o777:
            return False
        if path.read_bytes() != data:
            return False
    return True


def _new_version_dir(directory: Path) -> Path:
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    version = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    os.chmod(version, VERSION_DIR_MODE)
    return version


def _write_version(version: Path, files: Files) -> None:
    for relative, (data, mode) in files.items():
        path = version / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mode is not None:
            os.chmod(path, mode & 0o777)


def _link_through_data(directory: Path, name: str) -> None:
    """``name -> ..data/name``, left alone when it is that already. Made before ``..data`` is
    swapped, so a new key appears together with the version that has it."""
    link, target = directory / name, f"{DATA_LINK}/{name}"
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_dir() and not link.is_symlink():  # e.g. made for a subPath before the key came
        shutil.rmtree(link)
    _replace_with_symlink(directory / f"{DATA_LINK_TMP}.{name}", link, target)


def _swap_data_link(directory: Path, version: Path) -> None:
    _replace_with_symlink(directory / DATA_LINK_TMP, directory / DATA_LINK, version.name)


def _replace_with_symlink(temporary: Path, link: Path, target: str) -> None:
    """Point `link` at `target` in one step: a rename of a fresh symlink over it."""
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()  # left by a write that was interrupted
    os.symlink(target, temporary)
    os.replace(temporary, link)


def _remove_user_visible(path: Path) -> None:
    """A key gone from the payload: its symlink goes too (only a symlink: never data)."""
    if path.is_symlink():
        path.unlink()
