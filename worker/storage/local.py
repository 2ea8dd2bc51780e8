"""The local file system as an ``ObjectStore``, for ``file://`` locations (single-machine use).

A key is an absolute path without its leading ``/``. A create is conditional and atomic: the
bytes go to a hidden temporary file in the same folder, which is then hard-linked to its
name (``link`` fails when the name exists, so nothing is ever overwritten, and a reader never
sees a partial file).

Object metadata (which job and run wrote it, ``worker.storage.ownership``) is kept beside
the object, in a hidden ``.coremerge-meta`` folder, and that folder is written and read
without following a symbolic link: it is opened with ``O_NOFOLLOW`` (a link in its place is
refused), a metadata file is written to a fresh temporary name (``O_EXCL | O_NOFOLLOW``) and
hard-linked to its own (``link`` fails on any existing name, a planted link included), and
read with ``O_NOFOLLOW`` and a size cap. The folder is no hiding place either:
:meth:`LocalStore.iter_keys` lists, as objects nobody owns, whatever in it is not the
metadata of an object present (a planted file or link, a folder of it that is not a real
directory, an empty one), so the emptiness check of an output refuses an output that holds
a ``.coremerge-meta`` of anyone else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from jobs.errors import StorageError

from .objects import AlreadyExists, ObjectInfo, pinned_head

__all__ = ["META_DIR", "LocalStore"]

#: The hidden folder, beside the objects, holding their metadata.
META_DIR = ".coremerge-meta"
_TMP_PREFIX = ".coremerge-tmp-"
#: The largest metadata file read (a job's is about 200 bytes).
_MAX_META_BYTES = 4096
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _meta_name(path: Path) -> str:
    return f"{path.name}.json"


def _read_meta(path: Path) -> dict[str, str]:
    """The metadata of the object at ``path``: none for an object that is itself a link,
    or whose metadata is a link, not a small JSON object, or missing."""
    try:
        if os.path.islink(path):
            return {}
        folder = os.open(path.parent / META_DIR, _NOFOLLOW_DIR)
        try:
            fd = os.open(_meta_name(path), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
        finally:
            os.close(folder)
        with os.fdopen(fd, "rb") as f:
            text = f.read(_MAX_META_BYTES + 1)
        raw = json.loads(text) if len(text) <= _MAX_META_BYTES else None
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        return {}
    return raw


def _stray_meta(folder: Path, names: set[str]) -> Iterator[Path]:
    """What ``folder``'s ``.coremerge-meta`` holds besides the metadata of its objects
    (``names``, regular files): planted files or links, or the folder itself when it is
    not a real directory or is empty."""
    meta = folder / META_DIR
    try:
        mode = os.lstat(meta).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        yield meta
        return
    with os.scandir(meta) as entries:
        found = sorted(entries, key=lambda e: e.name)
    if not found:
        yield meta
    for entry in found:
        regular = entry.is_file(follow_symlinks=False)
        if entry.name.startswith(_TMP_PREFIX):
            continue  # a write in flight
        if not (regular and entry.name.endswith(".json") and entry.name[:-5] in names):
            yield meta / entry.name


class LocalStore:
    """Files under ``/`` addressed by keys (absolute paths without the leading ``/``)."""

    @staticmethod
    def _path(key: str) -> Path:
        return Path("/") / key

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()  # an input may be a link (its target is checked by the job)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            etag = f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
            return ObjectInfo(key, st.st_size, etag, _read_meta(path))
        if META_DIR in path.parts or os.path.islink(path):  # listed by iter_keys: nobody's
            return ObjectInfo(key, 0, "not-a-file", {}) if os.path.lexists(path) else None
        return None

    def iter_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        folder = base if prefix.endswith("/") else base.parent
        if not folder.is_dir():
            return
        for root, dirs, files in os.walk(folder):  # a folder at a time
            dirs[:] = sorted(d for d in dirs if d != META_DIR)
            objects = sorted(name for name in files if not name.startswith(_TMP_PREFIX))
            present = {n for n in objects if not os.path.islink(Path(root, n))}
            for path in [*(Path(root, n) for n in objects), *_stray_meta(Path(root), present)]:
                key = str(path)[1:]
                if key.startswith(prefix):
                    yield key

    def read(
        self, key: str, *, etag: str | None = None, length: int | None = None, start: int = 0
    ) -> bytes:
        pinned_head(self, key, etag, f"file:///{key}")
        with open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def download(self, key: str, dest: Path, *, etag: str, size: int) -> None:
        info = self.head(key)
        if info is None or info.etag != etag:
            raise StorageError(f"file:///{key}: changed while this job was reading it")
        shutil.copyfile(self._path(key), dest)

    def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
        """The metadata first, then the object: each linked to a name that must be free."""
        path = self._path(key)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        meta_written = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                tmp.write_bytes(source)
            else:
                shutil.copyfile(source, tmp)
            if metadata:
                meta_written = self._write_meta(path, key, metadata)
            try:
                os.link(tmp, path)  # atomic, and fails if the name is taken
            except FileExistsError:
                raise AlreadyExists(key) from None
            meta_written = False  # the object's now: kept
        except OSError as exc:
            raise StorageError(f"file:///{key}: cannot write ({exc.strerror})") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if meta_written:  # the object's name was taken: the metadata goes too
                self._unlink_meta(path)

    @staticmethod
    def _write_meta(path: Path, key: str, metadata: Mapping[str, str]) -> bool:
        """Write ``path``'s metadata without following any link; True once written. A name
        already there (another object's, or planted) is not replaced: ``AlreadyExists`` when
        the object's name is taken too, else ``StorageError``."""
        meta = path.parent / META_DIR
        with contextlib.suppress(FileExistsError):
            os.mkdir(meta)
        folder = os.open(meta, _NOFOLLOW_DIR)  # a link in its place: ELOOP or ENOTDIR
        tmp = f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder
            )
            with os.fdopen(fd, "w") as f:
                json.dump(dict(metadata), f)
            os.link(
                tmp, _meta_name(path), src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False
            )
            return True
        except FileExistsError:
            if os.path.lexists(path):
                raise AlreadyExists(key) from None
            raise StorageError(
                f"file:///{key}: its metadata name in {META_DIR} is taken by something this "
                "service did not write; nothing was written"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            os.close(folder)

    @staticmethod
    def _unlink_meta(path: Path) -> None:
        with contextlib.suppress(OSError):
            folder = os.open(path.parent / META_DIR, _NOFOLLOW_DIR)
            try:
                os.unlink(_meta_name(path), dir_fd=folder)
            finally:
                os.close(folder)
        with contextlib.suppress(OSError):  # only when empty (and a real directory)
            os.rmdir(path.parent / META_DIR)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._unlink_meta(path)

    def upload_sink(self, key: str, metadata: Mapping[str, str]) -> None:
        """No streamed creates: a local output is written beside the merge and created (an
        atomic link) once whole."""
        return None
