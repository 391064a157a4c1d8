"""Opening HDF5 inputs with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import h5py

from ..errors import GpusmdError


def open_h5(path, what: str, error: type[GpusmdError] = GpusmdError) -> h5py.File:
    """Open ``path`` read-only; a missing or unreadable file raises ``error`` naming it
    and what it should have been (e.g. "constants file")."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise error(f"{path}: not an HDF5 {what} ({e})") from None
