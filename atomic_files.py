"""One way to write a file so that a crash never leaves a torn one.

The data goes to a temp file in the same folder (``.NAME.<pid>_<random>.tmp``), is flushed (and
fsynced when asked), then takes the final name with ``os.replace`` (or a hard link that refuses an
existing name); with fsync the folder is fsynced too, so the new name survives a power cut. A
reader sees the previous file (or none) or the whole new one. Standard library only: the session
recorder and the checkpoint code both use it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


PID_DIGITS = 7  # Linux process ids stay below 2**22 = 4194304
TEMP_NAME_EXTRA_BYTES = len("." + "." + "0" * PID_DIGITS + "_" + "0" * 8 + ".tmp")  # what temp_name adds to a name
DEFAULT_NAME_MAX = 255  # longest file name in bytes on common file systems (ext4, xfs, btrfs, tmpfs)


def temp_name(path: Path) -> Path:
    """A temp file name beside ``path`` that no other writer picks (``.NAME.<pid>_<random>.tmp``): at most
    ``TEMP_NAME_EXTRA_BYTES`` bytes longer than ``path``'s name."""
    return path.with_name(f".{path.name}.{os.getpid()}_{uuid.uuid4().hex[:8]}.tmp")


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or of the nearest existing folder
    above it) takes; ``DEFAULT_NAME_MAX`` where it cannot be asked."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return DEFAULT_NAME_MAX


def max_saved_name_bytes(folder: str | os.PathLike) -> int:
    """The longest name (bytes, extension included) ``write_atomic`` can save in ``folder``: its temp
    file's name must fit the file system's limit too."""
    return min(name_max(folder), DEFAULT_NAME_MAX) - TEMP_NAME_EXTRA_BYTES


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], fsync: bool = True,
                 replace: bool = True, mode: int | None = None) -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) to ``path`` atomically.

    Args:
        fsync: fsync the file before the rename and the folder after it (durable across a power cut);
            without it the file is only flushed (fast, still never torn after a process crash).
        replace: replace an existing file; when False an existing name raises ``FileExistsError``
            (a hard link, never a rename over it, even when another writer took the name a moment ago).
        mode: the file's permission bits, such as 0o600 for a file only its owner may read; the temp
            file is created with them (never readable by others, not even for a moment) and they are
            set exactly, whatever the umask. None: the usual bits the umask leaves (0o644 under 022).
    """
    path = Path(path)
    tmp = temp_name(path)
    created = False
    # an opener only when asked for, so the plain call is open(tmp, "xb") and nothing more
    opener = {} if mode is None else {"opener": lambda name, flags: os.open(name, flags, mode)}
    try:
        with open(tmp, "xb", **opener) as f:  # "x": never clobber a temp file that is not ours
            created = True
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # the umask may have taken bits from the created file
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails when the name exists
            tmp.unlink()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()  # our own temp file only
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it is durable; silently skipped where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
