"""The output folder of a run: checked writable before any compute, locked against a second run, tidied.

``pipeline run`` calls :func:`open_output_folder` before it loads a single CCD.  It

* refuses an ``--out`` that is a file, cannot be created or cannot be written, with one
  line that names the folder and the reason (:class:`OutputError`);
* takes an exclusive lock (``.pipeline.lock``, an ``fcntl`` lock that the kernel releases
  when the process dies, so a killed run never leaves a stale lock) -- a second run into the
  same folder fails at once with the holder's pid, host and start time;
* removes temporaries a killed run left behind (``.<name>.<random>.tmp``, see
  :func:`pipeline.io.atomic_path`), which is safe only while the lock is held.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from pipeline.io import atomic_path, remove_orphan_temporaries

__all__ = ["OutputError", "OutputFolder", "open_output_folder", "LOCK_NAME", "MIN_FREE_BYTES"]

logger = logging.getLogger(__name__)

#: Name of the lock file in the output folder.
LOCK_NAME = ".pipeline.lock"
#: Below this much free space a run cannot even write its run.json: refuse to start.
MIN_FREE_BYTES = 1 << 20


class OutputError(OSError):
    """The output folder cannot be used (not a folder, not writable, full, or locked by another run)."""


@dataclasses.dataclass
class OutputFolder:
    """A locked, writable output folder; release the lock with :meth:`close` (or use ``with``)."""

    path: Path
    removed_temporaries: list[Path]
    free_bytes: int
    _fd: int | None = None

    def close(self) -> None:
        """Release the lock (the lock file stays; it is reused by the next run)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text() or "{}")
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"
    except (OSError, ValueError):
        return "another process"


def open_output_folder(path: str | Path, *, subfolders: tuple[str, ...] = ("ccds",)) -> OutputFolder:
    """Create, check and lock a run's output folder.

    Parameters
    ----------
    path : path
        The folder (created with its parents if missing).
    subfolders : tuple of str
        Subfolders the run writes into; each is created and checked writable.

    Returns
    -------
    OutputFolder
        Holding the lock until :meth:`OutputFolder.close`.

    Raises
    ------
    OutputError
        ``path`` is a file, cannot be created or written, has less than
        :data:`MIN_FREE_BYTES` free, or another run holds its lock.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {path} is a file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        for sub in subfolders:
            (path / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write into output folder {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise OutputError(f"output folder {path} is in use by another pipeline run ({_holder(lock_path)}); "
                              f"wait for it to finish or choose another --out") from None
        raise OutputError(f"cannot lock output folder {path}: {exc.strerror or exc}") from None
    folder = OutputFolder(path=path, removed_temporaries=[], free_bytes=0, _fd=fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        for sub in ("",) + tuple(subfolders):  # a real write (atomic) into every folder the run uses
            with atomic_path(path / sub / ".write-test") as tmp:
                tmp.write_bytes(b"ok")
            (path / sub / ".write-test").unlink()
        folder.free_bytes = shutil.disk_usage(path).free
        if folder.free_bytes < MIN_FREE_BYTES:
            raise OutputError(f"output folder {path} has only {folder.free_bytes} bytes free; free some space")
        folder.removed_temporaries = remove_orphan_temporaries(path)
    except OutputError:
        folder.close()
        raise
    except OSError as exc:
        folder.close()
        raise OutputError(f"cannot write into output folder {path}: {exc.strerror or exc}") from None
    if folder.removed_temporaries:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s",
                    len(folder.removed_temporaries), path)
    return folder
