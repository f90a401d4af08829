"""What every elastic supernet shares: its space, the active subnet, and how extracted models are finished."""
import copy
from typing import Any

import torch
import torch.nn as nn

from ..space import SearchSpace, Subnet

__all__ = ['ElasticSupernet']


class ElasticSupernet(nn.Module):
    """Base of the elastic supernets: a :class:`SearchSpace`, an active :class:`Subnet`, timm's model attributes.

    Families implement ``set_active(subnet)`` and ``extract(subnet)``.
    """
    space: SearchSpace
    active_subnet: Subnet
    in_chans: int
    pretrained_cfg: dict

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
