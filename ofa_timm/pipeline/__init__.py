"""The one-command pipeline: from a timm model and a dataset to a tested, exported subnet per budget.

    import ofa_timm
    result = ofa_timm.run(model='ofa_mobilenetv3_large_100', data_dir='data/', budgets='5ms,10ms,20ms', out='work/')

``ofa-timm run`` is the same from the command line. See :mod:`ofa_timm.pipeline.core` for the steps, and
:mod:`ofa_timm.pipeline.steps` for the work of each.
"""
from .config import (
    DEFAULT_SUBNETS, STEPS, BudgetResult, PipelineInterrupted, PipelineResult, RunConfig, demo_config)
from .core import run
from .data import Splits, carve_test_split, load_splits
from .workdir import WorkDir

__all__ = ['run', 'RunConfig', 'BudgetResult', 'PipelineResult', 'PipelineInterrupted', 'STEPS', 'DEFAULT_SUBNETS',
           'demo_config', 'Splits', 'carve_test_split', 'load_splits', 'WorkDir']
