"""The process's random state: saved in a checkpoint-safe form, and preserved around work that must not move it."""
import io
import random

import numpy as np
import torch

from ofa_timm._rng import preserved_rng, rng_state, set_rng_state


def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_preserved_rng_puts_back_every_generator_whatever_the_block_draws_or_seeds():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    expected = _draw()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    with preserved_rng(torch.device('cpu')):
        _draw()
        torch.manual_seed(7), np.random.seed(7), random.seed(7)
        seeded = _draw()
    assert _draw() == expected
    with preserved_rng():  # the same seeds inside draw the same numbers: a seeded block is reproducible
        torch.manual_seed(7), np.random.seed(7), random.seed(7)
        assert _draw() == seeded


def test_preserved_rng_restores_after_an_error():
    state = rng_state()
    try:
        with preserved_rng():
            _draw()
            raise KeyError('boom')
    except KeyError:
        pass
    after = rng_state()
    assert torch.equal(after['torch'], state['torch']) and torch.equal(after['numpy']['keys'], state['numpy']['keys'])
    assert after['python']['internal'].tolist() == state['python']['internal'].tolist()


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    np.random.randn()  # numpy's cached gaussian is part of its state
    buffer = io.BytesIO()
    torch.save({'rng': rng_state()}, buffer)
    expected = _draw() + (np.random.randn(),)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)['rng'])
    assert _draw() + (np.random.randn(),) == expected
