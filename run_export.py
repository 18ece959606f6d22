"""Export a tab's results as one zip: pictures as lossless PNG, the metric history as CSV, the
configuration and architecture as JSON, and a README.txt naming every file.

Pure file writing (numpy, Pillow, the standard library): the app gathers what to export and this
module lays it out, so a script can export the same way. The zip is a new file readable by the
server's user only (``private_files.create_private_file``: 0600, never an existing name, never
through a symlink).
"""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from private_files import create_private_file


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def history_csv(history: list[dict], columns: Sequence[str] = ()) -> str:
    """One row per iteration, one column per metric (``columns`` first, then any other key of the rows;
    ``iteration`` first); an empty history still has its header. None and non-finite values are written
    as empty cells and ``inf``/``nan`` as text."""
    columns = list(dict.fromkeys([*columns, *(key for row in history for key in row)]))
    if "iteration" in columns:
        columns.remove("iteration")
        columns.insert(0, "iteration")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in history:
        writer.writerow(["" if row.get(key) is None else repr(row[key]) if isinstance(row[key], float)
                         and not math.isfinite(row[key]) else row[key] for key in columns])
    return out.getvalue()


def write_export(path: str | Path, pictures: dict[str, tuple[np.ndarray, str]], history: list[dict],
                 config: dict, meta: dict, columns: Sequence[str] = ()) -> Path:
    """Write the export zip.

    Args:
        path: the zip to write: a new name (an existing file or symlink there raises ``FileExistsError``
            and is left alone); created 0600.
        pictures: file stem -> (uint8 (H, W, 3) picture, one-line description); None pictures are skipped.
        history: one metrics dict per iteration.
        config: the model configuration (JSON-serialisable), architecture included.
        meta: session, model step and iteration, export time and the like (JSON-serialisable).
        columns: the metrics.csv columns written even when ``history`` has no row.

    Returns:
        ``path``.
    """
    path = Path(path)
    lines = ["Concat World Model Explorer export", "",
             *(f"{key}: {value}" for key, value in meta.items()), "", "Files:"]
    with create_private_file(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for stem, (image, description) in pictures.items():
            if image is None:
                lines.append(f"  ({stem}.png: not available yet, {description})")
                continue
            zf.writestr(f"{stem}.png", _png(image))
            lines.append(f"  {stem}.png: {description} ({image.shape[1]}x{image.shape[0]} px, lossless PNG)")
        zf.writestr("metrics.csv", history_csv(history, columns))
        lines.append(f"  metrics.csv: the metric history, one row per iteration ({len(history)} rows), every metric")
        zf.writestr("config.json", json.dumps(config, indent=1, default=str))
        lines.append("  config.json: the world model's configuration, architecture included")
        zf.writestr("run.json", json.dumps(meta, indent=1, default=str))
        lines.append("  run.json: the session, the model's step and iteration, and when this was exported")
        lines.append("  README.txt: this file")
        zf.writestr("README.txt", "\n".join(lines) + "\n")
    return path
