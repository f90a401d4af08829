"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves nothing behind."""
import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

__all__ = ['atomic_path', 'write_text_atomic']

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary file is created with ``open()``'s default permissions, so the final file respects the umask like
    any file the user writes (``tempfile.mkstemp`` would make it 0600). Writers that take a path (``torch.save``,
    ``safetensors.torch.save_file``) write to the yielded path.

    Raises:
        ValueError: If the folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f'Cannot create the folder {str(path.parent)!r} for {path.name!r}: {e.strerror}') from None
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    except OSError as e:
        raise ValueError(f'Cannot write {str(path)!r}: {e.strerror}') from None
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
