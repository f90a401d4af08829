"""Workarounds for NNI 3.0, each isolated here with the bug it works around.

Tested with nni 3.0 and pytorch-lightning 2.4-2.6 (see the README).
"""
import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ['quiet_nni_import', 'fresh_trainer_evaluate', 'experiment_directory']


@contextlib.contextmanager
def quiet_nni_import() -> Iterator[None]:
    """Importing NNI 3.0 warns about its own code: deprecations from its dependencies, and a RuntimeWarning per
    ``torch.nn`` name that is not a module in current PyTorch (``Buffer``, ...). None concern the user's code, so they
    are filtered while NNI is imported."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
            warnings.simplefilter('ignore', category)
        yield


def fresh_trainer_evaluate(evaluator: Any, model: Any) -> Any:
    """Evaluate with a fresh copy of the evaluator's traced ``pl.Trainer``.

    NNI 3.0's sequential engine evaluates every sampled model with the same ``pl.Trainer``; from the second model on
    Lightning's stale state makes ``SupervisedLearningModule`` fail with ``KeyError: 'val_acc'``. A new trainer built
    from the traced arguments (``trainer.trace_copy().get()``) per evaluation avoids it.
    """
    evaluator.trainer = evaluator.trainer.trace_copy().get()
    return type(evaluator).evaluate(evaluator, model)


def experiment_directory(root: Union[str, os.PathLike, None]) -> str:
    """The folder NNI writes experiment files to.

    NNI 3.0 writes every experiment under ``$HOME/nni-experiments`` by default; the experiments this package starts
    write under ``root`` (default: ``./nni-experiments`` of the current directory) instead.
    """
    path = Path(root) if root is not None else Path.cwd() / 'nni-experiments'
    path.mkdir(parents=True, exist_ok=True)
    return str(path.resolve())
