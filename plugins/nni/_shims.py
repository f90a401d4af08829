"""Workarounds for NNI 3.0, each isolated here with the bug it works around.

Tested with nni 3.0 and pytorch-lightning 2.4-2.6 (see the README).
"""
import contextlib
import logging
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ['quiet_nni_import', 'fresh_trainer', 'experiment_directory', 'nni_home', 'quiet_experiment',
           'run_experiment']


@contextlib.contextmanager
def quiet_nni_import() -> Iterator[None]:
    """Importing NNI 3.0 warns about its own code: deprecations from its dependencies, and a RuntimeWarning per
    ``torch.nn`` name that is not a module in current PyTorch (``Buffer``, ...). None concern the user's code, so they
    are filtered while NNI is imported."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
            warnings.simplefilter('ignore', category)
        yield


def _evaluate_with_fresh_trainer(self: Any, model: Any) -> Any:
    # Lightning advertises a cloud logger whenever it builds a Trainer: once per model here, so not at all
    lightning_log = logging.getLogger('pytorch_lightning.utilities.rank_zero')
    tip = _DropMessages('\N{ELECTRIC LIGHT BULB} Tip:')
    lightning_log.addFilter(tip)
    try:
        self.trainer = self.trainer.trace_copy().get()
    finally:
        lightning_log.removeFilter(tip)
    return type(self).evaluate(self, model)


def fresh_trainer(evaluator: Any) -> Any:
    """Make a Lightning evaluator build a fresh ``pl.Trainer`` for every model it evaluates; returns it.

    NNI 3.0's sequential engine evaluates every sampled model with the evaluator's one ``pl.Trainer``. Its second
    ``fit`` starts with ``max_epochs`` already reached, validates nothing, and the final report fails with
    ``KeyError: 'val_acc'``. A trainer rebuilt from the traced arguments (``trainer.trace_copy().get()``) per
    evaluation avoids it. Only this evaluator object is changed (a bound method, which survives deep copies).
    """
    evaluator.evaluate = types.MethodType(_evaluate_with_fresh_trainer, evaluator)
    return evaluator


def experiment_directory(root: Union[str, os.PathLike, None]) -> str:
    """The folder for NNI's experiment files: ``root``, default ``./nni-experiments``, created if needed."""
    path = Path(root) if root is not None else Path.cwd() / 'nni-experiments'
    path.mkdir(parents=True, exist_ok=True)
    return str(path.resolve())


@contextlib.contextmanager
def nni_home(root: Union[str, os.PathLike, None]) -> Iterator[str]:
    """Keep NNI's experiment manifest out of ``$HOME`` while the context is open.

    NNI 3.0 writes experiment logs under ``config.experiment_working_directory`` but always records every experiment
    in ``$HOME/nni-experiments/.experiment``, a default bound when NNI is imported. Inside this context that manifest
    goes to ``root`` (default ``./nni-experiments``) instead; the previous default is restored on exit.
    """
    from nni.tools.nnictl.config_utils import Experiments
    directory = experiment_directory(root)
    previous = Experiments.__init__.__defaults__
    Experiments.__init__.__defaults__ = (directory,)
    try:
        yield directory
    finally:
        Experiments.__init__.__defaults__ = previous


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def quiet_experiment() -> Iterator[None]:
    """What NNI 3.0 prints while an experiment runs, less its noise.

    * NNI's one-shot strategies warn "Checkpoint callback is found to be None" each time the experiment is
      checkpointed if the evaluator's trainer does not checkpoint (``enable_checkpointing=False``, the user's choice):
      dropped.
    * NNI colours its console log even when stdout is a file: the escape codes go when stdout is not a terminal.
    * Lightning warns of modules in eval mode when training starts: the progressive-shrinking teacher is frozen in
      eval mode by design.
    """
    from nni.runtime import log as nni_log
    strategy_log = logging.getLogger('nni.nas.oneshot.pytorch.strategy')
    no_callback = _DropMessages('Checkpoint callback is found to be None')
    strategy_log.addFilter(no_callback)
    handler = getattr(nni_log, '_handlers', {}).get('_stdout_')
    colourful = handler.formatter if handler is not None else None
    if handler is not None and not sys.stdout.isatty() and hasattr(nni_log, '_LogFileFormatter'):
        handler.setFormatter(nni_log._LogFileFormatter())  # the format of NNI's own log files
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message=r'Found \d+ module\(s\) in eval mode at the start of training')
            yield
    finally:
        strategy_log.removeFilter(no_callback)
        if handler is not None:
            handler.setFormatter(colourful)


def run_experiment(exp: Any, root: Union[str, os.PathLike, None] = None) -> Any:
    """Run an NNI experiment in process with every file it writes under ``root`` (see :func:`nni_home`) and its
    console output quieted (see :func:`quiet_experiment`), stop it, and return it (its results stay readable)."""
    with nni_home(root) as directory, quiet_experiment():
        exp.config.experiment_working_directory = directory
        try:
            exp.run()
        finally:
            exp.stop()
    return exp
