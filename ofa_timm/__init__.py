"""Once-for-All elastic supernets for timm.

Turn a timm backbone into an elastic supernet, train it once, and extract stock timm subnets for every target.
"""
from .elastic import ElasticMobileNetV3, elasticize, ofa_mobilenetv3
from .space import SearchSpace, StageChoices, Subnet
from .plugins import ofa_models as _ofa_models  # noqa: F401  registers the timm entrypoints

__version__ = '0.1.0'

__all__ = ['Subnet', 'SearchSpace', 'StageChoices', 'elasticize', 'ElasticMobileNetV3', 'ofa_mobilenetv3']
