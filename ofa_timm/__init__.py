"""Once-for-All elastic supernets for timm.

Turn a timm backbone into an elastic supernet, train it once, and extract stock timm subnets for every target.
"""
from .elastic import ElasticMobileNetV3, elasticize, ofa_mobilenetv3
from .space import SearchSpace, StageChoices, Subnet
from .plugins import ofa_models as _ofa_models  # noqa: F401  registers the timm entrypoints

__version__ = '0.3.0.dev0'

__all__ = ['Subnet', 'SearchSpace', 'StageChoices', 'elasticize', 'ElasticMobileNetV3', 'ofa_mobilenetv3', 'run']


def __getattr__(name: str):
    # The pipeline imports training and search: load it when it is first used, so that `import ofa_timm` (which timm's
    # scripts do through --device-modules) stays light.
    if name == 'run':
        from .pipeline import run
        return run
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
