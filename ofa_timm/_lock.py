"""One writer per folder: a lock the operating system holds for the live process and drops when it dies.

A run folder (``ofa-timm train --output``) and the pipeline's work folder (``ofa-timm run --out``) are written by one
process at a time. The lock is an advisory ``flock`` (``msvcrt.locking`` on Windows) on ``<folder>/.lock``, so a run
that crashed, or was killed, never leaves the folder blocked; the file also names the process that holds it, for the
message a second writer gets.
"""
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Iterator, Optional, Union

__all__ = ['FolderInUse', 'folder_lock']

LOCK_NAME = '.lock'


class FolderInUse(ValueError):
    """Another live process holds the folder."""


def _try_lock(f: IO) -> bool:
    try:
        if os.name == 'nt':
            import msvcrt
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or '{}')
    except (OSError, ValueError):
        info = {}
    if not info:
        return 'another process'
    since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('since', 0)))
    return f"process {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, since {since})"


@contextlib.contextmanager
def folder_lock(folder: Union[str, os.PathLike], command: Optional[str] = None) -> Iterator[Path]:
    """Hold ``folder`` for this process while the ``with`` block runs.

    Args:
        folder: The folder (created if missing).
        command: What holds it, for the message a second writer gets (default: this process' command line).

    Raises:
        FolderInUse: Naming the process that holds the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    f = open(path, 'a+')
    try:
        if not _try_lock(f):
            raise FolderInUse(f'{folder} is in use by {_holder(path)}; wait for it to end, or write to another folder')
        f.seek(0)
        f.truncate()
        f.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), since=time.time(),
                                command=command or ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]))))
        f.flush()
        yield folder
    finally:
        f.close()  # closing the file releases the lock
