"""Atomic file writes: a reader never sees a half-written result or checkpoint. A folder that cannot
be created or written is a one-line `FedleakError` naming it, not a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedleak.common.errors import FedleakError


def _umask() -> int:
    """The process's umask: Linux shows it in /proc; elsewhere reading it means setting it (put straight back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unwritable(folder: Path, exc: OSError) -> FedleakError:
    """The one-line error for a folder fedleak cannot create or write (a path under a regular file, no
    permission, a read-only file system, a full disk)."""
    reason = exc.strerror or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != Path(folder) else ""
    return FedleakError(f"{folder}: cannot create or write this folder: {reason}{where}: pass an output folder "
                        f"you can write (--out), or fix its permissions")


def ensure_writable_dir(folder: Path) -> Path:
    """Create `folder` if needed and check a file can be written in it, creating no file that stays.

    Raises:
        FedleakError: the folder cannot be created (e.g. a parent is a regular file) or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():  # mkdir(exist_ok=True) accepts nothing else, but a race could swap it
            raise NotADirectoryError(20, "Not a directory", str(folder))
        fd, probe = tempfile.mkstemp(prefix=".fedleak-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise unwritable(folder, exc) from None
    return folder


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename.

    The file gets the mode any other tool would give a new file (0666 less the umask), not the 0600
    of the temporary file, so a report or results.json is as readable as the user's other files.

    Raises:
        FedleakError: the folder cannot be created or written (one line naming it).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise unwritable(path.parent, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # e.g. the disk filled up: no half-written file is left
        Path(tmp).unlink(missing_ok=True)
        raise FedleakError(f"{path}: could not be written: {exc.strerror or exc}: free space or pass another "
                           f"output folder") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """`atomic_write_text` of indented JSON (NaN allowed: results.py turns it into null first)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
