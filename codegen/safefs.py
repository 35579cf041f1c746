"""Files in folders that other users may be able to write (docs/codegen.md, "Autotuning").

Folders are checked before use (type, owner, who else may write); files are written whole through a temporary
file with a random name (``tempfile.mkstemp``: ``O_CREAT | O_EXCL | O_NOFOLLOW``) and ``os.replace``, and read with
``O_NOFOLLOW``: no name another user could plant first (a symlink, a FIFO) is ever opened, followed or imported.
"""
from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Optional

from attnforge.errors import CacheError

STALE_S = 3600  # a temporary file older than this was left by a writer that was killed
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _uid() -> Optional[int]:
    return os.geteuid() if hasattr(os, "geteuid") else None  # None: no owners to check (Windows)


def _others_may_replace(folder: Path) -> bool:
    """Whether a user other than us (or root) may rename entries of ``folder`` (it is writable by them, not sticky)."""
    st = os.stat(folder)
    foreign = _uid() is not None and st.st_uid not in (_uid(), 0)
    return foreign or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX)


def use_dir(path: Path, private: bool) -> Path:
    """``path`` as a folder fit to use, created (mode 0700) when missing; ``CacheError`` saying why it is not.

    Shared (the cache folder, data only): a symlink is followed only if it is ours, and a folder of another user
    that everyone may write in is refused. Private (the kernels folder, whose files are imported): no symlink, ours
    (write access of others is removed), in a folder no one else can swap it out of."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        link, st = os.lstat(path), os.stat(path)
        me, why = _uid(), None
        if stat.S_ISLNK(link.st_mode) and (private or link.st_uid != me):
            why = "is a symlink" + ("" if private else " made by another user")
        elif not stat.S_ISDIR(st.st_mode):
            why = "is not a folder"
        elif private and me is not None and st.st_uid != me:
            why = f"belongs to another user (uid {st.st_uid})"
        elif private and _others_may_replace(path.parent):
            why = f"may be replaced by other users (they may write in {path.parent})"
        elif not private and me is not None and st.st_uid != me and st.st_mode & 0o002:
            why = f"belongs to another user (uid {st.st_uid}) and everyone may write in it"
        elif private and st.st_mode & 0o022:
            os.chmod(path, stat.S_IMODE(st.st_mode) & 0o755)  # our own folder: others lose write access
    except OSError as e:
        raise CacheError(f"{path}: {e.strerror or e}") from e
    if why:
        raise CacheError(f"{path} {why}")
    return path


def read_regular(path: Path, limit: int = 1 << 28, private: bool = False) -> Optional[bytes]:
    """The bytes of the regular file ``path``, or None when there is none. ``ValueError`` when the name is a
    symlink (never followed), a folder or anything but a regular file, holds more than ``limit`` bytes, or
    (``private``) belongs to another user or may be written by others."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        if os.path.islink(path):
            raise ValueError(f"{path.name} is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if private and ((_uid() is not None and st.st_uid != _uid()) or st.st_mode & 0o022):
            raise ValueError(f"{path.name} may be written by another user")
        if st.st_size > limit:
            raise ValueError(f"{path.name} holds {st.st_size} bytes, more than {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def replace(path: Path, data: bytes, keep_mode: bool = False) -> None:
    """Write ``path`` whole: a temporary file with a random name in its folder, fsync, ``os.replace``. Readers never
    see half a file. ``keep_mode``: the new file gets the old one's permissions (a team's 0664 cache stays
    readable to the team), or the umask's for a first file; otherwise it is 0600."""
    mode = None
    if keep_mode:
        try:
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None
        except FileNotFoundError:
            pass
        mode = 0o666 & ~_umask() if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean_stale(folder: Path, pattern: str, age_s: float = STALE_S) -> None:
    """Remove the temporary files (``pattern``) that killed writers left in ``folder`` more than ``age_s`` ago
    (a live writer's are younger). Links are removed, never followed; what cannot be removed is left."""
    now = time.time()
    for p in folder.glob(pattern):
        try:
            if now - p.lstat().st_mtime > age_s:
                p.unlink()
        except OSError:
            pass
