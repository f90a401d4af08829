"""Shared fixtures. Fixtures built once per session are handed to each test through a yield fixture that restores the
state a test may change (active subnet, train/eval mode), so a failing test cannot leak it into the next."""
import pytest
import torch.nn as nn

import ofa_timm

from helpers import timm_model


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        'markers', 'slow: multi-process, subprocess or end-to-end runs (deselect with -m "not slow")')


@pytest.fixture(scope='session')
def _mbv3_large() -> nn.Module:
    return timm_model('mobilenetv3_large_100')


@pytest.fixture(scope='session')
def _mbv3_supernet(_mbv3_large) -> nn.Module:
    return ofa_timm.elasticize(_mbv3_large)


@pytest.fixture
def mbv3_large(_mbv3_large) -> nn.Module:
    """timm ``mobilenetv3_large_100`` (10 classes, randomized BN); tests must not modify it."""
    yield _mbv3_large.eval()
    _mbv3_large.eval()


@pytest.fixture
def mbv3_supernet(_mbv3_supernet) -> nn.Module:
    """The elastic supernet of ``mbv3_large`` in eval mode; its active subnet and mode are reset after the test."""
    yield _mbv3_supernet.eval()
    _mbv3_supernet.set_active(None)
    _mbv3_supernet.set_grad_checkpointing(False)
    _mbv3_supernet.zero_grad(set_to_none=True)
    _mbv3_supernet.eval()
