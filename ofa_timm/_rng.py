"""The process's random state (torch, CUDA, numpy, python): the one place that saves, restores and preserves it.

A checkpoint stores the state as tensors and plain numbers (so that it loads with ``weights_only=True``), and work that
must not move the run's random numbers (extracting a subnet draws init weights, a source check, a seeded sample)
runs inside :func:`preserved_rng`, so that training draws the same numbers with or without it.
"""
import contextlib
import random
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = ['preserved_rng', 'rng_state', 'set_rng_state']


def rng_state() -> Dict[str, Any]:
    """The random state of torch (CPU and every CUDA device), numpy and python, in a form safe to checkpoint."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'gauss': float(np_state[4])},
        'python': _python_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (its CUDA part only where CUDA is available)."""
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['internal'].tolist()), p['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@contextlib.contextmanager
def preserved_rng(device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block and then put back the random state of torch's CPU generator, of ``device``'s generator where it is
    a CUDA device, of numpy and of python, whatever the block drew or seeded."""
    cuda = [device.index or 0] if device is not None and device.type == 'cuda' else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _python_state_to_tensor(state: Tuple) -> Dict[str, Any]:
    version, internal, gauss = state
    return {'version': version, 'internal': torch.tensor(internal, dtype=torch.int64), 'gauss': gauss}
