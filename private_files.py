"""Folders and files that only the server's user can reach, for everything the app writes outside
``saved/`` (parked models, exports, Gradio's cache).

Another local account must not be able to read what the app writes there, nor plant or swap a
file or folder in its place. So:

- ``check_folder(path, what)``: the real path of a folder the app may write into, created 0700 when
  missing; a folder (or any folder above it) that another account could change is refused with
  ``UnsafeFolderError``, a sentence naming the setting. A folder the app only makes its own private
  folder in (``shared=True``) may also be a sticky, root-owned shared folder such as ``/tmp``;
- ``private_folder(parent, prefix)``: a new folder with an unguessable name, mode 0700
  (``tempfile.mkdtemp``), removed when the process ends (``remove_at_exit``);
- ``create_private_file(path)``: a new file, mode 0600, never following a symlink and never opening
  a name that exists (``O_CREAT | O_EXCL | O_NOFOLLOW``);
- ``remove_private_folders()``: removes the folders made by ``private_folder`` (the app's ``main()``
  calls it on exit, SIGTERM and SIGINT included; ``atexit`` covers the other ends);
- ``placeholders()``: each folder made here or named with ``show_as`` with the short name a message
  shows instead of its path.

Standard library only.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

PRIVATE_DIR_MODE = 0o700  # folders the app creates: its user alone may list, enter or change them
PRIVATE_FILE_MODE = 0o600  # files the app writes there: its user alone may read them


class UnsafeFolderError(Exception):
    """A folder the app would write into that another account could change (or read); the message is
    one sentence for the operator, naming the folder and the setting that chose it."""


# -----------------------------------------------------------------------------
# checking a folder


def _owner_ok(st: os.stat_result, uid: int, root_ok: bool) -> bool:
    return st.st_uid == uid or (root_ok and st.st_uid == 0)


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _problem(folder: Path, st: os.stat_result, uid: int, shared: bool) -> str | None:
    """Why another account could change entries of ``folder`` (None when it cannot).

    ``shared``: the app only creates its own unguessable private folder inside, so a folder that others
    may write to is fine when its sticky bit stops them renaming or deleting what they do not own
    and it belongs to root or to this user (``/tmp``)."""
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if not _owner_ok(st, uid, root_ok=shared):
        return f"it belongs to another account (uid {st.st_uid}, this server runs as uid {uid})"
    if _writable_by_others(st) and not (shared and st.st_mode & stat.S_ISVTX):
        return f"other accounts may write to it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _ancestor_problem(folder: Path, uid: int) -> str | None:
    """Why a folder above ``folder`` would let another account rename or swap it (None when none does)."""
    for above in reversed(folder.parents):
        try:
            st = os.stat(above)
        except OSError as e:
            return f"the folder {above} above it cannot be read ({e.strerror})"
        if not _owner_ok(st, uid, root_ok=True):
            return f"the folder {above} above it belongs to another account (uid {st.st_uid})"
        if _writable_by_others(st) and not st.st_mode & stat.S_ISVTX:
            return f"other accounts may write to the folder {above} above it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_folder(path: str | os.PathLike, what: str, shared: bool = False, create: bool = True) -> Path:
    """The real path of a folder the app writes into, after checking that no other account can change it.

    A missing folder (and any missing folder above it) is created with mode 0700, after checking the
    nearest existing folder above it.

    Args:
        path: the folder.
        what: how the operator chose it, for the message (e.g. ``"the park folder ($CWM_PARK_DIR)"``).
        shared: the app only makes its own private folder inside (``private_folder``): a sticky folder
            of root or this user that others may write to (``/tmp``) is accepted.
        create: create the folder when it is missing (else a missing folder is refused).

    Returns:
        The folder's real path (symlinks resolved once, here; later uses never follow them again).

    Raises:
        UnsafeFolderError: it (or a folder above it) belongs to another account, others may write to
            it, it is not a folder, or it cannot be created.
    """
    uid = os.geteuid()
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder.name)
        if folder.parent == folder:
            break
        folder = folder.parent
    if missing and not create:
        raise UnsafeFolderError(f"Refusing {what}: the folder {Path(folder, *reversed(missing))} does not exist.")
    folder = Path(os.path.realpath(folder))
    for name in reversed(missing):  # created one by one, each below a folder already checked
        problem = _check(folder, uid, shared=False)
        if problem:
            raise UnsafeFolderError(f"Refusing {what}: the app would create {folder / name} inside {folder}, but {problem}.")
        folder = folder / name
        try:
            os.mkdir(folder, PRIVATE_DIR_MODE)
            os.chmod(folder, PRIVATE_DIR_MODE)  # exactly 0700, whatever the umask
        except FileExistsError:
            pass  # made a moment ago by another process: checked below like any existing folder
        except OSError as e:
            raise UnsafeFolderError(f"Refusing {what}: the folder {folder} cannot be created ({e.strerror}).") from None
    problem = _check(folder, uid, shared)
    if problem:
        raise UnsafeFolderError(f"Refusing {what} {folder}: {problem}. Use a folder that only the account "
                                f"running the app (uid {uid}) can change, or leave the setting unset.")
    return folder


def _check(folder: Path, uid: int, shared: bool) -> str | None:
    try:
        st = os.stat(folder)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    return _problem(folder, st, uid, shared) or _ancestor_problem(folder, uid)


def readable_by_others(folder: str | os.PathLike) -> bool:
    """Whether accounts other than the owner may list or enter ``folder``."""
    return bool(os.stat(folder).st_mode & 0o077)


# -----------------------------------------------------------------------------
# private folders and files


_made: set[Path] = set()  # private folders this process made: removed at its end
_shown: dict[Path, str] = {}  # folders the app writes into -> the placeholder messages show instead
_lock = threading.Lock()


def private_folder(parent: str | os.PathLike, prefix: str, placeholder: str = "<temp>") -> Path:
    """A new folder with an unguessable name inside ``parent`` (checked by the caller with
    ``check_folder(shared=True)``), mode 0700, deleted by ``remove_private_folders`` (at the latest
    when the process ends). Messages show ``placeholder`` instead of its path."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    with _lock:
        _made.add(folder)
        _shown[folder] = placeholder
    return folder


def show_as(folder: str | os.PathLike, placeholder: str) -> None:
    """Show ``placeholder`` instead of ``folder`` in messages (a folder the app writes into but did not make)."""
    with _lock:
        _shown.setdefault(Path(folder), placeholder)


def placeholders() -> list[tuple[Path, str]]:
    """(folder, placeholder) of every folder registered here, longest path first (replace in that order)."""
    with _lock:
        pairs = list(_shown.items())
    return sorted(pairs, key=lambda pair: len(str(pair[0])), reverse=True)


def forget_private_folder(folder: str | os.PathLike) -> None:
    """Delete one folder ``private_folder`` made, now (its owner is done with it)."""
    folder = Path(folder)
    with _lock:
        if folder not in _made:
            return
        _made.discard(folder)
    shutil.rmtree(folder, ignore_errors=True)


def remove_private_folders() -> None:
    """Delete every folder ``private_folder`` made (their files included); safe to call more than once."""
    with _lock:
        made = list(_made)
        _made.clear()
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(remove_private_folders)


def create_private_file(path: str | os.PathLike) -> BinaryIO:
    """Open a new file for writing, readable by this user only (0600); never follows a symlink and never
    opens a name that exists (``FileExistsError``, also for a symlink there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # exactly 0600, whatever the umask
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
