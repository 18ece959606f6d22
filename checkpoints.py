"""The world model's checkpoint files: format, writing, reading, validation and the folder's listing.

- ``write_checkpoint``: atomic (``atomic_files.write_atomic``: temp file, fsync, rename, folder fsync)
  and readable by the server's user only (0o600);
- ``read_checkpoint``: checks every zip CRC-32 (``torch.load`` skips them), then unpickles plain
  tensors and containers only (``weights_only=True``), so a file can neither run code nor load a
  flipped bit silently;
- ``validate_payload``: architecture, weights and optimizer moments checked against the live model
  before anything is loaded into it;
- ``RefusedFiles``: the checkpoint files a tab refused, shared by every tab of one checkpoint
  folder, so that whichever tab saves next keeps the refused file under a new name first;
- ``checkpoint_summaries``: the folder's ``.pth`` files with their counters, for the page.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from atomic_files import write_atomic
from validation import is_int

CHECKPOINT_FORMAT = "concat-world-model/1"  # bump when the checkpoint layout changes
CHECKPOINT_MODE = 0o600  # checkpoint files are the server user's alone


class CheckpointError(Exception):
    """A checkpoint that cannot be saved or loaded; the live model is left as it was."""


# -----------------------------------------------------------------------------
# writing and reading


def write_checkpoint(path: Path, payload: dict, replace: bool = True) -> Path:
    """Write ``payload`` with ``torch.save`` atomically; a crash mid-save leaves the previous file
    intact and concurrent saves leave one complete file. With ``replace`` False an existing file is
    never replaced. The file is readable and writable by the server's user only (0o600): it holds
    the trained weights and the name of the session trained on. Failures raise ``CheckpointError``
    naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path)
    try:
        write_atomic(path, lambda f: torch.save(payload, f), fsync=True, replace=replace, mode=CHECKPOINT_MODE)
    except FileExistsError as e:
        raise CheckpointError(f"a checkpoint named {path.stem} already exists: choose another name") from e
    except OSError as e:
        raise CheckpointError(f"could not save the checkpoint {path.name}: {e.strerror or e}") from e
    return path


def read_checkpoint(path: Path, mmap: bool = False):
    """The unpickled contents of a checkpoint file, after checking its zip CRC-32s.

    Raises:
        CheckpointError: no such file, or a file that is damaged or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file named {path.name}")
    try:
        with zipfile.ZipFile(path) as zf:  # torch.load skips the CRC-32s: a flipped bit would load silently
            bad = zf.testzip()
        if bad is not None:
            raise ValueError(f"checksum mismatch in {bad}")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # unpickling and zip errors come in many types
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path.name} is not a readable checkpoint ({type(e).__name__}: {first_line})") from e


def _remove_stale_temp_files(path: Path, older_than_s: float = 600.0) -> None:
    """Delete temp files that a killed save of this checkpoint left behind (ours by their name)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def portable_optimizer_state(state: dict) -> dict:
    """An optimizer state dict on the CPU, as an eager optimizer on any device loads it: a rate held
    as a tensor (for CUDA graphs) saved as a float, the graphs' ``capturable`` flag cleared."""
    state = to_cpu(state)
    for group in state.get("param_groups", []):
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


def to_cpu(obj):
    """A copy of nested dicts, lists and tuples with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# -----------------------------------------------------------------------------
# validation against the live model


def validate_payload(payload, path: Path, architecture: dict, live_model: dict,
                     params: list[torch.Tensor]) -> tuple[dict, dict | None]:
    """Check a checkpoint's contents against the live model before loading anything.

    Args:
        architecture: the live config's ``architecture()``.
        live_model: the live model's ``state_dict()``.
        params: the optimizer's parameters in its order (the optimizer state indexes them).

    Returns:
        (model state, optimizer state or None).

    Raises:
        CheckpointError: naming what does not fit.
    """
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path.name} is not a world-model checkpoint of format {CHECKPOINT_FORMAT}")
    arch = payload.get("architecture")
    if arch != architecture:
        diff = {k: (v, (arch or {}).get(k)) for k, v in architecture.items() if (arch or {}).get(k) != v}
        raise CheckpointError(f"{path.name} was trained with another architecture (this model vs file: {diff})")
    model_state = payload.get("model")
    if not isinstance(model_state, dict) or set(model_state) != set(live_model):
        raise CheckpointError(f"{path.name} holds no complete set of model weights")
    for k, v in live_model.items():
        t = model_state[k]
        if not isinstance(t, torch.Tensor) or t.shape != v.shape or not torch.isfinite(t).all():
            raise CheckpointError(f"{path.name}: weight {k} is missing, misshapen or not finite")
    for key in ("step", "iteration"):
        value = payload.get(key, 0)
        if not is_int(value) or value < 0:
            raise CheckpointError(f"{path.name}: '{key}' must be a whole number >= 0, got {value!r}")
    optim_state = payload.get("optimizer")
    if optim_state is not None:
        _validate_optimizer_state(optim_state, path, params)
    return model_state, optim_state


def _validate_optimizer_state(state, path: Path, params: list[torch.Tensor]) -> None:
    """AdamW moments must match their parameters, be finite, and second moments >= 0; a bad
    moment would otherwise load and turn the weights to NaN at the next step."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    moments = state.get("state") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(moments, dict):
        raise CheckpointError(f"{path.name}: the optimizer state is malformed")
    for index, entry in moments.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise CheckpointError(f"{path.name}: the optimizer state names an unknown parameter {index!r}")
        for name in ("exp_avg", "exp_avg_sq"):
            t = entry.get(name)
            if not isinstance(t, torch.Tensor) or t.shape != params[index].shape or not torch.isfinite(t).all():
                raise CheckpointError(f"{path.name}: optimizer {name} of parameter {index} is missing, misshapen or not finite")
        if (entry["exp_avg_sq"] < 0).any():
            raise CheckpointError(f"{path.name}: optimizer exp_avg_sq of parameter {index} is negative")


# -----------------------------------------------------------------------------
# refused files


@dataclass(frozen=True)
class FileIdentity:
    """Which file sits at a path (device, inode, size, modification time): tells the file a tab
    refused from one another tab wrote there since."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileIdentity | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class RefusedFiles:
    """The checkpoint files that tabs refused (another architecture, damaged), held by whoever owns
    the checkpoint folder and shared by its tabs. A refused file is never overwritten: the next save
    to its path first keeps it under a new name, and "set aside, then save" is one step across tabs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused: set[FileIdentity] = set()

    def refuse(self, identity: FileIdentity) -> None:
        with self._lock:
            self._refused.add(identity)

    def save_over(self, path: Path, save: Callable[[], None], refused_here: bool) -> tuple[bool, str | None, str]:
        """Run ``save`` (which writes ``path``), first setting aside the file at ``path`` when any
        tab refused it. ``refused_here``: the caller refused a file there itself (a note then says
        why nothing was set aside).

        Returns:
            (saved, the name the refused file was kept under or None, a note: why the save failed,
            or why a refused file was not set aside).
        """
        aside, note = None, ""
        with self._lock:
            try:
                current = FileIdentity.of(path)
                if current is not None and current in self._refused:
                    aside, note = _set_aside(path, current)
                    self._refused.discard(current)
                elif refused_here:
                    note = "the refused file had already been set aside or replaced, so it was left alone"
                save()
            except (CheckpointError, OSError) as e:
                return False, aside, str(e)
        return True, aside, note


def _set_aside(path: Path, refused: FileIdentity) -> tuple[str | None, str]:
    """Keep the refused checkpoint under a new name that cannot collide, but only when the file at
    ``path`` is still that very file. Returns (new name or None, a note when it was not moved)."""
    if FileIdentity.of(path) != refused:
        return None, "the refused file had already been replaced or set aside, so it was left alone"
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    kept = path.with_name(f"{path.stem}.refused-{stamp}{path.suffix}")
    try:
        os.link(path, kept)  # a second name for the file; never overwrites; the save then replaces `path`
        linked = True
    except FileNotFoundError:
        return None, "the refused file was already gone"
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.rename(path, kept)  # no hard links here; the name is unique, so nothing is overwritten
        linked = False
    if linked and FileIdentity.of(kept) != refused:  # another program swapped the file in between
        kept.unlink()  # only our second name of its file goes: the file itself stays at `path`
        return None, "the checkpoint file changed while it was being set aside, so it was left alone"
    return kept.name, ""


# -----------------------------------------------------------------------------
# the folder's listing


@dataclass(frozen=True)
class CheckpointSummary:
    """One ``.pth`` file of the checkpoint folder: its counters, when it was saved and on which session
    (None when the file predates that field), or why it cannot be read."""

    name: str
    path: Path
    step: int | None = None
    iteration: int | None = None
    saved_at: float | None = None
    session: str | None = None
    problem: str = ""


def checkpoint_summaries(folder: str | os.PathLike) -> list[CheckpointSummary]:
    """Every ``*.pth`` file directly in ``folder``, newest first (temporary files skipped), read with
    ``read_checkpoint``; a damaged one is listed with its problem."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("*.pth") if not p.name.startswith(".") and p.is_file()]
    out = []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            payload = read_checkpoint(path, mmap=True)
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a world-model checkpoint of format {CHECKPOINT_FORMAT}")
            session = payload.get("session")
            out.append(CheckpointSummary(path.stem, path, int(payload.get("step", 0)), int(payload.get("iteration", 0)),
                                         float(payload.get("saved_at", path.stat().st_mtime)),
                                         session if isinstance(session, str) else None))
        except CheckpointError as e:
            out.append(CheckpointSummary(path.stem, path, problem=f"cannot be read ({e.__cause__ and type(e.__cause__).__name__}: "
                                                                  f"{(str(e.__cause__).strip().splitlines() or [''])[0][:120]})"))
        except Exception as e:  # a file of another kind
            first_line = (str(e).strip().splitlines() or [""])[0][:120]
            out.append(CheckpointSummary(path.stem, path, problem=f"cannot be read ({type(e).__name__}: {first_line})"))
    return out
