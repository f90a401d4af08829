"""NNI integration: OFA progressive shrinking as an NNI one-shot strategy, and NNI search over a trained supernet.

Requires the ``nni`` extra (``pip install 'ofa-timm[nni]'``); tested with nni 3.0 and pytorch-lightning 2.4-2.6.
"""
from ._shims import experiment_directory, fresh_trainer, nni_home, quiet_nni_import, run_experiment
from .space import SharedSubnet, SupernetSpace
from .strategy import OFAProgressiveShrinking, ProgressiveShrinkingModule

__all__ = [
    'SupernetSpace', 'SharedSubnet', 'OFAProgressiveShrinking', 'ProgressiveShrinkingModule', 'experiment_directory',
    'fresh_trainer', 'quiet_nni_import', 'nni_home', 'run_experiment',
]
