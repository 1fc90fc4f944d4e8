"""Writing a file so that it is either wholly there, new, or as it was: never half-written.

For keys and certificates (sshtrail.signing, collector.ca), a host's enrollment, and the
collector's recording blobs. The temporary file is created 0600 (mkstemp: O_EXCL) and given
its mode before any byte is written, so a secret is never readable by others, not even between
create and rename; fsync before the rename, and of the directory after, so the new content
survives a power cut once this returns.
"""
from __future__ import annotations

import os
import tempfile


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600, *,
                 tmp_prefix: str = ".tmp-") -> None:
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
