"""What every elastic supernet shares: its space, the active subnet, timm's model attributes and configs, and how
extracted models are finished."""
import copy
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..space import SearchSpace, Subnet

__all__ = ['ElasticSupernet', 'imagenet_cfg', 'map_key']


def imagenet_cfg(**overrides: Any) -> Dict[str, Any]:
    """A timm ``pretrained_cfg`` for ImageNet-style models at 224 px, with ``overrides``."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier', **overrides,
    }


def map_key(key: str, rules: Sequence[Tuple[str, str]]) -> Optional[str]:
    """Rename ``key`` by the first ``(regex, replacement)`` rule that matches it whole; None if none does."""
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


class ElasticSupernet(nn.Module):
    """Base of the elastic supernets: a :class:`SearchSpace`, an active :class:`Subnet`, timm's model attributes.

    Families implement ``set_active(subnet)`` and ``extract(subnet)``.
    """
    space: SearchSpace
    active_subnet: Subnet
    in_chans: int
    pretrained_cfg: dict

    def _adopt_source_attributes(self, model: nn.Module) -> None:
        """Take the timm model attributes a supernet shares with its (already copied) source model."""
        self.num_classes = model.num_classes
        self.drop_rate = model.drop_rate
        self.num_features = model.num_features
        self.head_hidden_size = model.head_hidden_size
        self.feature_info = copy.deepcopy(model.feature_info)
        self.grad_checkpointing = False
        source_cfg = getattr(model, 'pretrained_cfg', None)
        self.pretrained_cfg = copy.deepcopy(source_cfg) if source_cfg else self._default_cfg(model.num_classes)
        self.default_cfg = self.pretrained_cfg

    @staticmethod
    def _default_cfg(num_classes: int) -> Dict[str, Any]:
        """The ``pretrained_cfg`` of a source model built without one."""
        return imagenet_cfg(num_classes=num_classes)

    def sample_active(self, seed: Any = None) -> Subnet:
        """Activate a random subnet of the space (see ``SearchSpace.sample``) and return it."""
        return self.set_active(self.space.sample(seed))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _finish_extracted(self, model: nn.Module, subnet: Subnet) -> nn.Module:
        """Give an extracted model the supernet's train/eval mode and a ``pretrained_cfg`` with the subnet's
        resolution as ``input_size``."""
        model.train(self.training)
        cfg = copy.deepcopy(self.pretrained_cfg)
        if subnet.resolution is not None:
            cfg['input_size'] = (self.in_chans, subnet.resolution, subnet.resolution)
        model.pretrained_cfg = model.default_cfg = cfg
        return model
