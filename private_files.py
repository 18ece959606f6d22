"""Folders and files that only the server's user can reach, for everything the app writes outside
``saved/`` (parked models, exports, Gradio's cache).

Another local account must not be able to read what the app writes there, nor plant or swap a
file or folder in its place. So:

- ``check_folder(path, what)``: the real path of a folder the app may write into, created 0700 when
  missing; a folder (or any folder above it) that another account could change is refused with
  ``UnsafeFolderError``, a sentence naming the setting. A folder the app only makes its own private
  folder in (``shared=True``) may also be a sticky, root-owned shared folder such as ``/tmp``;
- ``private_folder(parent, prefix)``: a new folder with an unguessable name, mode 0700
  (``tempfile.mkdtemp``); whoever makes it deletes it;
- ``PrivateFolder``: such a folder inside the (checked) system temp folder, made on first use, made
  again when it has gone, deleted by ``close()`` (the app's ``main()`` calls it on exit, SIGTERM and
  SIGINT included) or by its finalizer (the object dropped, or the process ending). Each owner holds
  its own: nothing here is a process-wide registry;
- ``create_private_file(path)``: a new file, mode 0600, never following a symlink and never opening
  a name that exists (``O_CREAT | O_EXCL | O_NOFOLLOW``).

Standard library only.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import weakref
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


def private_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder with an unguessable name inside ``parent`` (checked by the caller with
    ``check_folder(shared=True)``), mode 0700. The caller deletes it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, PRIVATE_DIR_MODE)
    return folder


class PrivateFolder:
    """A private folder (``private_folder``) inside the system temp folder, made on the first ``path()``.

    ``path()`` checks it again each time: one that has gone (a temp cleaner) or that is no longer this
    user's own is never used again, and a new one is made. ``close()`` deletes every folder it made
    that is still this user's own; its finalizer does the same when the object is dropped or the
    process ends.

    Args:
        prefix: the start of the folder's name (``cwm-exports-``).
        what: the folder it is made in, in words, for ``UnsafeFolderError`` (``"the system temp folder
            ($TMPDIR) for exports"``).
        parent: where to make it (default: the system temp folder, as ``tempfile.gettempdir()`` says
            at the first ``path()``).
    """

    def __init__(self, prefix: str, what: str, parent: str | os.PathLike | None = None):
        self.prefix, self.what, self.parent = prefix, what, parent
        self._lock = threading.Lock()
        self._current: Path | None = None
        self._made: list[Path] = []  # shared with the finalizer
        self._finalizer = weakref.finalize(self, _remove_own_folders, self._made)

    def path(self) -> Path:
        """The folder, checked (made when missing, or when the last one is gone or not ours any more).

        Raises:
            UnsafeFolderError: the folder it would be made in could be changed by another account.
        """
        with self._lock:
            if self._current is not None:
                try:
                    return check_folder(self._current, self.what, create=False)
                except UnsafeFolderError:
                    self._current = None  # gone or not ours any more: never used again
            parent = self.parent if self.parent is not None else tempfile.gettempdir()
            parent = check_folder(parent, self.what, shared=True)
            self._current = private_folder(parent, self.prefix)
            self._made.append(self._current)
            return self._current

    def close(self) -> None:
        """Delete the folders made here (their files included); safe to call more than once."""
        with self._lock:
            self._current = None
            self._finalizer()


def _remove_own_folders(folders: list[Path]) -> None:
    """Delete each folder of ``folders`` that is still a folder of this user's own (never one another
    account made in its place after it had gone)."""
    uid = os.geteuid()
    while folders:
        folder = folders.pop()
        try:
            st = os.lstat(folder)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            shutil.rmtree(folder, ignore_errors=True)


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
