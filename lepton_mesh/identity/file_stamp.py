"""Whether credential files changed on disk, without reading them."""

from __future__ import annotations

import os

FileStamp = tuple[tuple[int, int, int], ...]


def files_stamp(paths: tuple[str, ...] | list[str]) -> FileStamp:
    """(inode, size, mtime) of each path: follows a secret mount's symlink swap
    as well as an in-place rewrite, and an atomic rename (a new inode). Raises
    OSError when a file cannot be stat'ed."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
