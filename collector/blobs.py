"""Where recording bytes live, apart from the store that indexes them (collector.store).

A BlobStore maps keys such as "server_id/sid/000001" to bytes. Keys are built from server_id
and sid as hosts send them, so every key is checked before it comes near a path: a blob is
never written outside its root, and never seen half-written (a power cut leaves either the old
blob or the new one). Recordings are kept compressed: `compress`/`decompress` are the one place
that knows how.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import zstandard

from sshtrail import files

from sshtrail.errors import SshtrailError

# One path component of a key. server_id is [A-Za-z0-9._-]{1,128} (sshtrail.signing) and sids
# and chunk numbers are hex or digits, so an allowlist costs nothing and rules out "/", NUL,
# backslashes, control and look-alike characters at once; "." and ".." are refused apart.
_PART = re.compile(r"[A-Za-z0-9._-]{1,255}\Z")
# Temporary files carry a character no key may contain, so a key can never name one.
_TMP_PREFIX = "~tmp-"
ZSTD_LEVEL = 3


class BlobError(SshtrailError):
    """A key is refused, or a blob cannot be written or read; the message says which."""


class BlobNotFound(BlobError):
    """No blob under that key."""


def check_key(key: str) -> list[str]:
    """The key's components, or BlobError if the key could reach outside the store."""
    if not isinstance(key, str) or not key:
        raise BlobError(f"blob key {key!r} is empty or not text")
    parts = key.split("/")
    for part in parts:
        if part in (".", "..") or not _PART.match(part):
            raise BlobError(f"blob key {key!r} is refused: each '/'-separated part must be "
                            "1-255 characters of A-Z a-z 0-9 . _ - and not '.' or '..'")
    return parts


class BlobStore:
    """The interface: bytes by key. put replaces whole blobs atomically."""

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        """The blob's bytes; BlobNotFound if there is none."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError


class DirBlobStore(BlobStore):
    """Blobs as files under `root`, one per key, directories following the key's parts."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise BlobError(f"cannot create the blob directory {self.root}: {e.strerror}; "
                            "create it and make it writable by the collector's user") from None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            self._make_parents(path.parent)
            # Hosts delete their copy once the upload is acknowledged: the bytes are on disk,
            # and the rename too, before this returns.
            files.write_atomic(path, data, 0o600, tmp_prefix=_TMP_PREFIX)
        except OSError as e:
            raise BlobError(f"cannot write blob {key!r} under {self.root}: {e.strerror or e}; "
                            "check free space and permissions") from None

    def _make_parents(self, parent: Path) -> None:
        missing = []
        d = parent
        while d != self.root and not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o750)
            except FileExistsError:
                pass  # another thread made it first; a file there fails mkstemp below
            files.fsync_dir(d.parent)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(f"no blob {key!r} under {self.root}") from None
        except OSError as e:
            raise BlobError(f"cannot read blob {key!r} under {self.root}: {e.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


# zstandard's (de)compressor objects must not be used by two threads at once.
_local = threading.local()


def compress(data: bytes) -> bytes:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c.compress(data)


def decompress(data: bytes) -> bytes:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    try:
        # A decompressobj also reads frames that do not record their content size; it
        # returns what it could of a truncated frame, hence the check of eof.
        obj = d.decompressobj()
        out = obj.decompress(data)
        if not obj.eof:
            raise zstandard.ZstdError("the frame is truncated")
        return out
    except zstandard.ZstdError as e:
        raise BlobError(f"stored blob is not valid zstandard data ({e})") from None
