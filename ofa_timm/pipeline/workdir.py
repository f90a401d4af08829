"""The pipeline's work folder: one record per step of the inputs it used, so that a rerun skips what is done and
still valid, continues what is half done, and redoes what an input change made stale.

A step's record (``steps/<step>.json``) holds its inputs (arguments, and digests of the files it read, which are the
outputs of the steps before it), whether it completed, its outputs and a summary. A step is done when its record is
complete, its inputs equal the current ones and its outputs exist. Because inputs include the digests of upstream
outputs, a change anywhere reruns exactly the steps downstream of it.
"""
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from .._io import write_text_atomic

__all__ = ['WorkDir', 'file_digest', 'tree_digest', 'canonical']


def canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings), so records compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def file_digest(path: Union[str, os.PathLike]) -> str:
    """sha256 of a file (memoised by path, size and modification time, so large checkpoints are read once)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def tree_digest(paths: Iterable[Union[str, os.PathLike]]) -> str:
    """A digest of folders' file listings (relative paths and sizes): cheap for large datasets, and it changes when
    an image is added, removed, renamed or rewritten with another size."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                h.update(f'{p.relative_to(root).as_posix()}:{p.stat().st_size}\n'.encode())
    return h.hexdigest()


class WorkDir:
    """Step records in ``<root>/steps``.

    Args:
        root: The work folder.
    """

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)
        (self.root / 'steps').mkdir(parents=True, exist_ok=True)

    def _path(self, step: str) -> Path:
        return self.root / 'steps' / f'{step}.json'

    def record(self, step: str) -> Optional[Dict[str, Any]]:
        path = self._path(step)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def done(self, step: str, inputs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The step's record if it completed with these inputs and its outputs exist; None otherwise."""
        rec = self.record(step)
        if (rec is None or not rec.get('complete') or rec.get('inputs') != canonical(inputs)
                or not all((self.root / p).exists() for p in rec.get('outputs', []))):
            return None
        return rec

    def begin(self, step: str, inputs: Dict[str, Any]) -> bool:
        """Mark the step started with ``inputs``; returns whether an unfinished run of it with the same inputs can
        be continued (False: start it afresh, its earlier outputs are stale)."""
        rec = self.record(step)
        resumable = rec is not None and rec.get('inputs') == canonical(inputs)
        write_text_atomic(self._path(step), json.dumps(dict(
            inputs=canonical(inputs), complete=False,
            started=(rec or {}).get('started') if resumable else time.time()), indent=1) + '\n')
        return resumable

    def finish(self, step: str, inputs: Dict[str, Any], outputs: List[Union[str, os.PathLike]],
               summary: Optional[Dict[str, Any]] = None, seconds: float = 0.0) -> Dict[str, Any]:
        rel = [Path(p).resolve().relative_to(self.root.resolve()).as_posix() for p in outputs]
        rec = dict(inputs=canonical(inputs), complete=True, outputs=rel, summary=canonical(summary or {}),
                   seconds=round(seconds, 3), finished=time.time())
        write_text_atomic(self._path(step), json.dumps(rec, indent=1) + '\n')
        return rec
