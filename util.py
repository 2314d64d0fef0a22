"""What every module needs and none owns: the error a user can fix, and a write that a crash cannot leave
half done. Imports nothing of the project."""

import os
from pathlib import Path


class UserError(ValueError):
    """Something the user can fix (a file, a flag, a model); the scripts print it as one line, no traceback."""


def write_atomically(file, data):
    """`data` (bytes) to a temporary file renamed over `file`: a crash or a full disk leaves the old file whole."""
    file = Path(file)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, file)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{file.parent}: cannot write {file.name} ({e.strerror or e})") from None
