"""The local file system as an ``ObjectStore``, for ``file://`` locations (single-machine use).

A key is an absolute path without its leading ``/``. A create is conditional and atomic: the
bytes go to a hidden temporary file in the same folder, which is then hard-linked to its
name (``link`` fails when the name exists, so nothing is ever overwritten, and a reader never
sees a partial file). Object metadata (which job and run wrote it) is kept beside the object,
in a hidden ``.coremerge-meta`` folder that :meth:`LocalStore.list` does not show.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from jobs.errors import AdapterNotFound, StorageError

from .objects import AlreadyExists, ObjectInfo

__all__ = ["META_DIR", "LocalStore"]

#: The hidden folder, beside the objects, holding their metadata.
META_DIR = ".coremerge-meta"
_TMP_PREFIX = ".coremerge-tmp-"


def _meta_path(path: Path) -> Path:
    return path.parent / META_DIR / f"{path.name}.json"


class LocalStore:
    """Files under ``/`` addressed by keys (absolute paths without the leading ``/``)."""

    @staticmethod
    def _path(key: str) -> Path:
        return Path("/") / key

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        try:
            metadata = json.loads(_meta_path(path).read_text())
        except (OSError, ValueError):
            metadata = {}
        return ObjectInfo(key, st.st_size, f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}", metadata)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        folder = base if prefix.endswith("/") else base.parent
        if not folder.is_dir():
            return []
        keys = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != META_DIR]
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = str(Path(root, name))[1:]
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def read(
        self, key: str, *, etag: str | None = None, length: int | None = None, start: int = 0
    ) -> bytes:
        info = self.head(key)
        if info is None:
            raise AdapterNotFound(f"file:///{key}: not found")
        if etag is not None and info.etag != etag:
            raise StorageError(f"file:///{key}: changed while this job was reading it")
        with open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def download(self, key: str, dest: Path, *, etag: str, size: int) -> None:
        info = self.head(key)
        if info is None or info.etag != etag:
            raise StorageError(f"file:///{key}: changed while this job was reading it")
        shutil.copyfile(self._path(key), dest)

    def create(self, key: str, source: Path | bytes, metadata: Mapping[str, str]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            if isinstance(source, bytes):
                tmp.write_bytes(source)
            else:
                shutil.copyfile(source, tmp)
            try:
                os.link(tmp, path)  # atomic, and fails if the name is taken
            except FileExistsError:
                raise AlreadyExists(key) from None
            if metadata:
                meta = _meta_path(path)
                meta.parent.mkdir(exist_ok=True)
                meta.write_text(json.dumps(dict(metadata)))
        except OSError as exc:
            raise StorageError(f"file:///{key}: cannot write ({exc.strerror})") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def delete(self, key: str) -> None:
        path = self._path(key)
        for p in (path, _meta_path(path)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(OSError):  # only when empty
            _meta_path(path).parent.rmdir()
