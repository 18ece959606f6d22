"""Bounding the memory of many tabs' models: the resident-model cap, idle parking, and handing
freed memory back to the system.

``ModelPool`` keeps at most ``max_resident`` controllers' models in memory and parks the others
(``RunController.park``: saved to a private folder and freed); a daemon thread sweeps for idle
models. The pool knows controllers only through ``park(folder)``, ``is_resident`` and
``last_used``, so this module sits below ``run_controller``; a controller tells the pool why a park
failed (``park_failed``), and the pool logs each cause once and waits ``retry_s`` before asking
that controller again.

The parked files live in a folder of their own (mode 0700, an unguessable name) inside the park
folder, which ``private_files.check_folder`` accepts only when no other account can change it; the
folder and its files are deleted by ``close()``, when the pool is dropped and when the process ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path

import torch

from config import LOGGER_NAME
from private_files import check_folder, private_folder

LOG = logging.getLogger(f"{LOGGER_NAME}.engine")  # a child of the app's logger: its level applies


def return_freed_memory(collect: bool = True) -> float:
    """Hand freed memory back to the system; returns the seconds it took.

    With ``collect``: a garbage collection and, on CUDA, the caching allocator's free blocks first
    (after models were dropped). Then always glibc's ``malloc_trim``, which also releases free pages
    inside the heap: a run allocates and frees tens of MB of buffers per iteration among long-lived
    small objects, and without it the freed pages stay resident and the process's RSS creeps up.
    """
    t = time.perf_counter()
    if collect:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return time.perf_counter() - t


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would): with one arena per worker thread,
    memory freed by a departed tab stays scattered and is never returned. True when applied."""
    libc = _glibc()
    if libc is None:
        return False
    M_ARENA_MAX = -8  # from glibc's malloc.h
    return bool(libc.mallopt(M_ARENA_MAX, int(arenas)))


def _glibc():
    """glibc through ctypes, or None where the C library is another one (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if not name or "libc" not in name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only (musl and macOS lack them)
    except (OSError, AttributeError):
        return None
    return libc


class ModelPool:
    """Keeps at most ``max_resident`` models of many controllers in memory and parks (saves to a
    private folder and frees) any model unused for ``idle_s``; a daemon thread sweeps every
    ``sweep_s`` and returns freed memory to the system. Controllers reload their parked model at
    their next use.

    Args:
        idle_s: park a model unused this long (> 0).
        max_resident: models kept in memory at once (>= 1).
        sweep_s: how often the sweeper looks (at least 0.5 s).
        folder: where the private folder of parked files is made (default: the system temp folder);
            created 0700 when missing.
        retry_s: a controller whose park failed (a full disk) is not asked again for this long.

    Raises:
        private_files.UnsafeFolderError: ``folder`` (or a folder above it) is one that another account
            could change: it could swap a parked file or the private folder itself.
    """

    def __init__(self, idle_s: float = 300.0, max_resident: int = 4, sweep_s: float = 15.0,
                 folder: str | os.PathLike | None = None, retry_s: float = 60.0):
        if not idle_s > 0 or max_resident < 1:
            raise ValueError(f"idle_s must be > 0 and max_resident >= 1 (got {idle_s}, {max_resident})")
        self.idle_s, self.max_resident, self.retry_s = float(idle_s), int(max_resident), float(retry_s)
        what = "the park folder ($CWM_PARK_DIR)" if folder is not None else "the system temp folder for parked models"
        parent = check_folder(folder if folder is not None else tempfile.gettempdir(), what, shared=True)
        self.folder = private_folder(parent, "cwm-parked-")  # mode 0700: only this user reads it
        self._controllers: weakref.WeakSet = weakref.WeakSet()  # RunController objects
        self._failed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> when its park failed
        self._causes_logged: set[tuple] = set()  # park failure causes already logged (until a park works again)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._freed = threading.Event()  # set when memory was freed; the sweeper hands it back to the system
        self._wake = threading.Event()  # wakes the sweeper early (memory was freed, or the pool closes)
        self._finalizer = weakref.finalize(self, _close_pool, self._closed, self._wake, self.folder)
        self._thread = threading.Thread(target=_sweep_forever, args=(weakref.ref(self), max(0.5, float(sweep_s))),
                                        name="model-pool-sweeper", daemon=True)
        self._thread.start()

    def register(self, controller) -> None:
        """Watch ``controller`` (a ``RunController``; held weakly)."""
        with self._lock:
            self._controllers.add(controller)

    def forget(self, controller) -> None:
        """Stop watching a released controller; its freed memory goes back at the next sweep."""
        with self._lock:
            self._controllers.discard(controller)
        self._freed.set()
        self._wake.set()

    def resident(self) -> list:
        """Controllers whose model is in memory, least recently used first."""
        with self._lock:
            live = [c for c in self._controllers if c.is_resident]
        return sorted(live, key=lambda c: c.last_used)

    def used(self, controller) -> None:
        """Called when a controller uses its model: park the least recently used others until at
        most ``max_resident`` are in memory (a running or busy one is skipped, the next one tried)."""
        others = [c for c in self.resident() if c is not controller]
        excess = len(others) + 1 - self.max_resident
        for c in others:
            if excess <= 0:
                break
            if self._park(c):
                excess -= 1
                self._freed.set()
                self._wake.set()

    def sweep(self, now: float | None = None) -> int:
        """Park every model unused for ``idle_s``; returns how many were parked."""
        now = time.monotonic() if now is None else now
        parked = sum(self._park(c, now) for c in self.resident() if now - c.last_used >= self.idle_s)
        if parked:
            self._freed.set()
        if self._freed.is_set():
            self._freed.clear()
            return_freed_memory()
        return parked

    def _park(self, controller, now: float | None = None) -> bool:
        """Park ``controller``'s model unless its last park failed less than ``retry_s`` ago."""
        now = time.monotonic() if now is None else now
        failed_at = self._failed.get(controller)
        if failed_at is not None and now - failed_at < self.retry_s:
            return False
        if self._closed.is_set():
            return False
        if not controller.park(self.folder):
            if controller in self._failed and self._failed[controller] is None:  # it failed just now
                self._failed[controller] = now
            return False
        self._failed.pop(controller, None)
        with self._lock:
            recovered, self._causes_logged = bool(self._causes_logged), set()
        if recovered:
            LOG.info("parking idle models works again")
        return True

    def park_failed(self, controller, error: BaseException) -> None:
        """Called by a controller whose ``park`` could not write its file (a full disk, a vanished
        folder): log the cause once (not once per model per sweep) and wait ``retry_s`` before
        asking that controller again; its model stays in memory meanwhile."""
        self._failed[controller] = None  # _park stamps the time (the sweep's clock)
        cause = (type(error).__name__, getattr(error, "errno", None))
        with self._lock:
            first = cause not in self._causes_logged
            self._causes_logged.add(cause)
        if first:
            reason = getattr(error, "strerror", None) or type(error).__name__
            LOG.warning("could not park an idle model (%s); it stays in memory, parking is retried every %.0f s "
                        "and this cause is not logged again until a park works", reason, self.retry_s)

    def close(self) -> None:
        """Stop sweeping and delete the parked files."""
        self._finalizer()


def _sweep_forever(pool_ref: weakref.ref, every_s: float) -> None:
    """The sweeper thread; it holds the pool weakly, so a dropped pool (and its folder) goes."""
    while True:
        pool = pool_ref()
        if pool is None or pool._closed.is_set():
            return
        try:
            pool.sweep()
        except Exception as e:  # a sweep must never kill the thread; the next one tries again
            LOG.warning("model pool sweep failed: %s", e)
        closed, wake = pool._closed, pool._wake
        del pool
        wake.wait(every_s)
        wake.clear()
        if closed.is_set():
            return


def _close_pool(closed: threading.Event, wake: threading.Event, folder: Path) -> None:
    """Stop the sweeper and delete the parked files (the pool's finalizer: runs once, at the latest
    when the process ends)."""
    closed.set()
    wake.set()
    shutil.rmtree(folder, ignore_errors=True)
