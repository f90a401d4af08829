"""Elastic EfficientNet: a timm ``EfficientNet``-class model as an OFA supernet, and its subnets as stock timm models.

timm's ``EfficientNet`` class builds EfficientNet, EfficientNet-Lite, MobileNetV2, MNASNet, FBNet-C, SPNASNet and
TinyNet. What the supernet makes elastic is the same as for MobileNetV3 (see ``efficientnet_builder``); what is
particular to the class is its head, which runs ``conv_head`` and ``bn2`` before pooling, and its squeeze-excite,
which reduces relative to the block input (``round(mid * 0.25 / e)``, so elastic expand keeps the SE width).

TF-ported ``tf_*`` variants (TF 'same' padding) are refused with the name of their symmetric-padding counterpart.
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import EfficientNet

from .._timm import round_channels
from .base import BlockSpec, LayerSpec
from .efficientnet_builder import EfficientNetBuilderSupernet, classifier_spec

__all__ = ['ElasticEfficientNet']


class ElasticEfficientNet(EfficientNetBuilderSupernet):
    """Elastic supernet over a timm ``EfficientNet`` (e.g. ``efficientnet_b0``, ``mobilenetv2_100``, ``mnasnet_100``,
    ``fbnetc_100``, ``spnasnet_100``, ``tinynet_a``); extracted subnets are stock ``EfficientNet`` models."""
    source_types = (EfficientNet,)
    timm_sources = ('efficientnet_b0', 'efficientnet_b1', 'efficientnet_b2', 'efficientnet_b3', 'efficientnet_lite0',
                    'mobilenetv2_100', 'mobilenetv2_140', 'mnasnet_100', 'fbnetc_100', 'spnasnet_100', 'tinynet_a')
    se_rules = ((False, round), (False, round_channels))  # EfficientNet builds with se_from_exp=False

    def _adopt_head(self, model: EfficientNet) -> None:
        self.conv_head = model.conv_head
        self.bn2 = model.bn2
        self.global_pool = model.global_pool
        self.classifier = model.classifier
        if isinstance(self.conv_head, nn.Conv2d) and type(self.bn2.act) is not type(model.bn1.act):
            raise ValueError(f'Head activation {type(self.bn2.act).__name__} differs from the stem activation '
                             f'{type(model.bn1.act).__name__}; timm builds both from one act_layer')

    def _build_kwargs(self) -> Dict[str, Any]:
        head = self.conv_head
        return dict(
            num_features=head.out_channels if isinstance(head, nn.Conv2d) else 0,
            stem_kernel_size=self.conv_stem.kernel_size[0],
        )

    def _head_modules(self) -> Tuple[str, ...]:
        return 'conv_head', 'bn2', 'global_pool', 'classifier'

    def _describe_head(self, reduction: int) -> BlockSpec:
        head = self.conv_head
        layers: Tuple[LayerSpec, ...] = ()
        in_chs = self.num_features
        if isinstance(head, nn.Conv2d):
            in_chs = head.in_channels
            layers = (LayerSpec('conv', head.in_channels, head.out_channels, bias=head.bias is not None,
                                reduction=reduction),
                      LayerSpec('norm', head.out_channels, head.out_channels, reduction=reduction))
        return BlockSpec(
            'head', 'head', in_chs, self.num_classes, self.num_features, 1, 1, 1.0, reduction,
            act=type(getattr(self.bn2, 'act', self.bn2)).__name__, layers=layers + classifier_spec(self.classifier),
            modules=self._head_modules())

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv_stem|bn1',
            blocks=[(r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)', None), (r'conv_head|bn2', (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        weight = self.bn1.weight
        self.global_pool, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=weight.device, dtype=weight.dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    def _exit_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)
