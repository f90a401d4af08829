"""Files: atomic writes, and the one safe reader of weight files with errors that name the file and the fault.

A reader never sees a half-written file, a failed write leaves nothing behind, and reading weights never unpickles
arbitrary objects (safetensors, or ``torch.load(weights_only=True)``).
"""
import argparse
import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

__all__ = ['atomic_path', 'staged_folder', 'respect_umask', 'write_text_atomic', 'load_weights', 'save_safetensors',
           'save_supernet', 'checkpoint_metadata', 'supernet_model_args', 'model_args_from_metadata']

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    The final file has ``open()``'s default permissions, so it respects the umask like any file the user writes
    (``tempfile.mkstemp`` and ``safetensors.torch.save_file`` would make it 0600). Writers that take a path
    (``torch.save``, ``safetensors.torch.save_file``) write to the yielded path.

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
        mode = os.stat(tmp).st_mode & 0o777
    except OSError as e:
        raise ValueError(f'Cannot write {str(path)!r}: {e.strerror}') from None
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staged_folder(out: PathLike) -> Iterator[Path]:
    """Yield an empty staging folder next to the folder ``out``; on success its files move into ``out`` (a rename
    when ``out`` does not exist yet, replacing files of the same names otherwise), with the permissions of files the
    user writes; on failure it is removed. A failure never leaves a partial folder behind.

    Raises:
        ValueError: If ``out`` is a file, or its parent cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f'{str(out)!r} is a file; give a folder')
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', suffix='.partial', dir=out.parent))
    except OSError as e:
        raise ValueError(f'Cannot write to {str(out)!r}: {e.strerror}') from None
    try:
        yield staging
        respect_umask(staging, *staging.rglob('*'))  # not mkdtemp's 0700 nor safetensors' 0600
        if not out.exists():
            os.replace(staging, out)
            return
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir() and not item.is_dir():
                raise ValueError(f'{str(target)!r} is a folder; cannot replace it with a file')
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        staging.rmdir()
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def respect_umask(*paths: PathLike) -> None:
    """Give files and folders another writer created the permissions ``open()`` / ``mkdir()`` give new ones (0666 /
    0777 less the umask): ``safetensors`` and ``timm.models.save_for_hf`` write 0600 files, ``tempfile.mkdtemp``
    0700 folders."""
    for path in map(Path, paths):
        probe = path.with_name(f'.{path.name}.{os.getpid()}.mode')
        folder = path.is_dir()
        if folder:
            probe.mkdir()
        else:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            os.chmod(path, os.stat(probe).st_mode & 0o777)
        finally:
            if folder:
                probe.rmdir()
            else:
                probe.unlink()


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# --- weights ---------------------------------------------------------------------------------------------------------
def save_safetensors(state: Mapping[str, Any], path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a state dict as safetensors (CPU, contiguous) atomically, with string ``metadata``."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={'format': 'pt', **(metadata or {})})
    return Path(path)


def load_weights(path: PathLike) -> Tuple[Any, Dict[str, str]]:
    """Read a weights file without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)`` (which also
    accepts the ``argparse.Namespace`` that timm's ``train.py`` stores in its checkpoints).

    Returns:
        (contents, metadata): the tensors (or the checkpoint object), and the file's metadata (a safetensors header's,
        or a checkpoint dict's ``'metadata'`` entry; empty if there is none).

    Raises:
        ValueError: Naming the file and what is wrong with it (missing, empty, truncated, not a weights file, or
            holding Python objects other than tensors).
    """
    import torch
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Cannot load weights from '{path}': {'it is a folder' if path.is_dir() else 'no such file'}")
    if path.stat().st_size == 0:
        raise ValueError(f"Cannot load weights from '{path}': the file is empty")
    if path.suffix == '.safetensors':
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework='pt', device='cpu') as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # SafetensorError and I/O errors: any failure to parse is a bad file
            raise ValueError(f"Cannot load weights from '{path}': not a complete safetensors file, truncated or "
                             f"corrupt ({_first_line(e)})") from None
    try:
        with _safe_globals(torch):
            contents = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # RuntimeError, EOFError, OSError, IndexError, UnpicklingError...: a bad file
        unsafe = _unsafe_globals(torch, path) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:
            raise ValueError(f"Cannot load weights from '{path}': it holds Python objects other than tensors "
                             f"({', '.join(unsafe)}), which are not unpickled (weights_only=True); save the "
                             f"state_dict alone") from None
        with open(path, 'rb') as f:
            magic = f.read(4)
        # torch.save writes a zip archive (or, before torch 1.6, a pickle): anything else is not a checkpoint
        if not (magic == b'PK\x03\x04' or magic[:1] == b'\x80'):
            # torch's own message would advise weights_only=False, which cannot help with a file that is not one
            raise ValueError(f"Cannot load weights from '{path}': not a PyTorch checkpoint (neither a zip archive "
                             f"nor a pickle)") from None
        raise ValueError(f"Cannot load weights from '{path}': truncated or corrupt "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    metadata = contents.get('metadata') if isinstance(contents, dict) else None
    return contents, dict(metadata) if isinstance(metadata, Mapping) else {}


def _safe_globals(torch: Any) -> contextlib.AbstractContextManager:
    if hasattr(torch.serialization, 'safe_globals'):
        return torch.serialization.safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def _unsafe_globals(torch: Any, path: Path) -> list:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # older torch, or not a zip checkpoint
        return []


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --- checkpoint metadata ---------------------------------------------------------------------------------------------
def checkpoint_metadata(supernet: Any) -> Dict[str, str]:
    """What a checkpoint of ``supernet`` needs to rebuild its model, as strings (safetensors metadata).

    ``model`` (the registered name), ``num_classes``, ``in_chans``, ``resolutions``, ``space`` (``space.to_dict()``)
    and ``model_args`` (the JSON-able ``timm.create_model`` kwargs, as ``save_for_hf`` records them).
    """
    model_args = supernet_model_args(supernet)
    return {
        'model': str(supernet.pretrained_cfg.get('architecture') or ''),
        'num_classes': str(supernet.num_classes),
        'in_chans': str(supernet.in_chans),
        'resolutions': json.dumps(list(supernet.space.resolutions)),
        'space': json.dumps(supernet.space.to_dict()),
        'model_args': json.dumps(model_args),
    }


def supernet_model_args(supernet: Any) -> Dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild ``supernet``: the JSON-able ones it was created with (a source
    model's ``depth``, ``img_size``, ...), its class count, input channels and resolutions."""
    model_args = {k: v for k, v in getattr(supernet, '_model_args', {}).items() if _json_able(v)}
    model_args.update(num_classes=supernet.num_classes, in_chans=supernet.in_chans,
                      resolutions=list(supernet.space.resolutions))
    return model_args


def save_supernet(supernet: Any, path: PathLike) -> Path:
    """Write a supernet's weights as safetensors, atomically, with what rebuilds its model in the metadata
    (:func:`checkpoint_metadata`): ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``
    loads it back."""
    return save_safetensors(supernet.state_dict(), path, checkpoint_metadata(supernet))


def model_args_from_metadata(metadata: Mapping[str, str]) -> Dict[str, Any]:
    """The model kwargs that :func:`checkpoint_metadata` recorded (empty for files without them)."""
    try:
        args = json.loads(metadata.get('model_args', '{}'))
    except (TypeError, ValueError):
        return {}
    return dict(args) if isinstance(args, dict) else {}


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
