"""timm registry entrypoints: every OFA supernet and subnet is one ``timm.create_model`` call away.

After ``import ofa_timm``::

    timm.create_model('ofa_mbv3')                           # elastic supernet (trainable), canonical w1.2 space
    timm.create_model('ofa_mbv3', subnet='min')             # stock timm MobileNetV3 of the smallest subnet
    timm.create_model('ofa_mobilenetv3_large_100', pretrained=True, subnet='subnet.json')

``subnet`` takes ``None`` (the supernet), ``'max'``, ``'min'``, a ``Subnet``, a dict (ours or the reference
implementation's form) or the path of a subnet JSON file. Pretrained weights of a supernet (the published OFA
checkpoints, timm's weights of a converted source model, or this project's checkpoints) load into the supernet and
are then extracted; a checkpoint of the subnet itself (e.g. from ``save_for_hf``) loads directly.
"""
import re
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional

import timm
import torch
import torch.nn as nn
from timm.models import (
    FeatureListNet, adapt_input_conv, build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, list_pretrained,
    load_pretrained, register_model)

from ofa_timm._timm import FeatureGetterNet, pretrained_cfg_for_features
from ofa_timm.elastic import FAMILIES, elasticize
from ofa_timm.elastic.base import imagenet_cfg
from ofa_timm.elastic.mobilenetv3 import ofa_mobilenetv3
from ofa_timm.elastic.resnet import ofa_resnet50 as build_ofa_resnet50
from ofa_timm.space import SubnetLike

__all__ = ['checkpoint_filter_fn', 'create_ofa_model']

_OFA_NETS_URL = 'https://raw.githubusercontent.com/han-cai/files/master/ofa/ofa_nets/'
# The reference downloads OFA-ResNet50 from Google Drive; pass pretrained_cfg_overlay=dict(file=...) if that fails.
_OFA_RESNET50_URL = 'https://drive.google.com/uc?id=1xy6VIPEHXqbbqNu3xEZUxhp5FbTVs5cQ'

# Converted supernets: registered name -> timm source model. Their weights are the source's own timm weights.
_CONVERTED = {
    'ofa_mobilenetv3_large_100': 'mobilenetv3_large_100',
    'ofa_mobilenetv3_large_075': 'mobilenetv3_large_075',
    'ofa_mobilenetv3_small_100': 'mobilenetv3_small_100',
    'ofa_mobilenetv4_conv_small': 'mobilenetv4_conv_small',
    'ofa_mobilenetv4_conv_medium': 'mobilenetv4_conv_medium',
    'ofa_lcnet_100': 'lcnet_100',
    'ofa_efficientnet_b0': 'efficientnet_b0',
    'ofa_efficientnet_b1': 'efficientnet_b1',
    'ofa_efficientnet_b2': 'efficientnet_b2',
    'ofa_efficientnet_b3': 'efficientnet_b3',
    'ofa_efficientnet_lite0': 'efficientnet_lite0',
    'ofa_mobilenetv2_100': 'mobilenetv2_100',
    'ofa_mobilenetv2_140': 'mobilenetv2_140',
    'ofa_mnasnet_100': 'mnasnet_100',
    'ofa_fbnetc_100': 'fbnetc_100',
    'ofa_spnasnet_100': 'spnasnet_100',
    'ofa_tinynet_a': 'tinynet_a',
    'ofa_resnet50d': 'resnet50d',
    'ofa_resnet26d': 'resnet26d',
    'ofa_resnet101': 'resnet101',
    'ofa_resnet34': 'resnet34',
}
# Keyword arguments that shape a converted supernet's space rather than the timm source model.
_SPACE_OPTIONS = frozenset(option for family in FAMILIES for option in family.space_options)


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return imagenet_cfg(url=url, license='mit', **kwargs)


def _source_cfgs(name: str, source: str) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs of a converted name: one tag per timm tag of the source, the source's default first."""
    default = get_pretrained_cfg(source)
    tags = [t.split('.', 1)[1] for t in list_pretrained(f'{source}.*')]
    if default is not None and default.tag in tags:
        tags.remove(default.tag)
        tags.insert(0, default.tag)
    cfgs = {}
    for tag in tags:
        cfg = get_pretrained_cfg(f'{source}.{tag}').to_dict()
        for key in ('architecture', 'tag'):
            cfg.pop(key, None)
        cfgs[f'{name}.{tag}'] = cfg
    if not cfgs:  # no timm weights: still a registered (randomly initialised) supernet
        resnet = 'resnet' in source
        cfgs[name] = _cfg(first_conv='conv1.0' if resnet else 'conv_stem', classifier='fc' if resnet else 'classifier')
    return cfgs


default_cfgs = generate_default_cfgs({
    'ofa_mbv3_w12.ofa_in1k': _cfg(url=_OFA_NETS_URL + 'ofa_mbv3_d234_e346_k357_w1.2'),
    'ofa_mbv3_w10.ofa_in1k': _cfg(url=_OFA_NETS_URL + 'ofa_mbv3_d234_e346_k357_w1.0'),
    'ofa_mbv3.ofa_in1k': _cfg(url=_OFA_NETS_URL + 'ofa_mbv3_d234_e346_k357_w1.2'),
    'ofa_resnet50.ofa_in1k': _cfg(url=_OFA_RESNET50_URL, first_conv='conv1.conv_in', classifier='fc'),
    **{k: v for name, source in _CONVERTED.items() for k, v in _source_cfgs(name, source).items()},
})


# --- checkpoint conversion ------------------------------------------------------------------------------------------
def _unwrap(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    for key in ('state_dict', 'model', 'state_dict_ema'):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    # DistributedDataParallel / torch.compile prefixes
    return {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in state_dict.items()}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Turn a checkpoint into a state dict for an ofa_timm supernet.

    Handles the reference implementation's checkpoints (current and legacy key names, wrapped in ``state_dict``),
    timm weights of a converted source model (kernel transforms missing: identity), and this project's checkpoints
    (wrapped in ``model`` / ``state_dict``, DDP prefixes). Classifier weights of another class count are dropped
    (timm's loader then keeps the new head), and a first conv of another input-channel count is adapted as timm does.
    """
    state_dict = _unwrap(state_dict)
    state_dict = model.convert_reference_state_dict(state_dict) or state_dict
    own = model.state_dict()
    out = dict(state_dict)
    for key, value in own.items():
        if key not in out and re.search(r'kernel_transform_\d+to\d+$', key):
            out[key] = torch.eye(value.shape[0], dtype=value.dtype)  # timm source weights: identity transforms
    classifier = model.pretrained_cfg.get('classifier', 'classifier')
    for key in (f'{classifier}.weight', f'{classifier}.bias'):
        if key in out and key in own and out[key].shape != own[key].shape:
            del out[key]
    first = f"{model.pretrained_cfg.get('first_conv', '')}.weight"
    if first in out and first in own and out[first].shape[1] != own[first].shape[1]:
        out[first] = adapt_input_conv(own[first].shape[1], out[first])
    _check_fits(out, own, model.pretrained_cfg.get('architecture', type(model).__name__), ignore=classifier + '.')
    return out


def _check_fits(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], name: str, ignore: str) -> None:
    """Raise a RuntimeError naming missing, unexpected and mis-shaped keys (up to 10 of each)."""
    def listed(keys: list) -> str:
        return f'{keys[:10]}{f" and {len(keys) - 10} more" if len(keys) > 10 else ""}'

    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f'Checkpoint does not fit {name}: missing keys {listed(missing)}, unexpected keys {listed(unexpected)}, '
            f'shape mismatches {listed(mismatched)}')


def _subnet_filter(
        state_dict: Mapping[str, Any], model: nn.Module, supernet: nn.Module, subnet: Any,
) -> Dict[str, torch.Tensor]:
    """Weights for an extracted subnet: the checkpoint itself if it is the subnet's, else extracted from it."""
    own = model.state_dict()
    flat = _unwrap(state_dict)
    if flat.keys() == own.keys() and all(flat[k].shape == own[k].shape for k in own):
        return flat
    supernet.load_state_dict(checkpoint_filter_fn(state_dict, supernet), strict=False)  # checked by the filter
    return supernet.extract(subnet).state_dict()


# --- model creation -------------------------------------------------------------------------------------------------
def create_ofa_model(
        variant: str,
        build_supernet: Callable[..., nn.Module],
        pretrained: bool = False,
        subnet: Optional[SubnetLike] = None,
        **kwargs: Any,
) -> nn.Module:
    """Build a registered supernet, load its weights, and optionally extract a subnet as a stock timm model.

    Args:
        variant: Registered model name.
        build_supernet: Returns the (randomly initialised) supernet from model kwargs.
        pretrained: Load the pretrained weights of ``pretrained_cfg`` (URL, hub, file or local-dir).
        subnet: None for the supernet, else ``'max'``, ``'min'``, a ``Subnet``, a dict or a JSON path.
        **kwargs: Model kwargs (``num_classes``, ``in_chans``, ``drop_rate``, space options, ``features_only``...).
    """
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3, 4))
    kwargs.pop('feature_cls', None)
    supernet = build_model_with_cfg(build_supernet, variant, pretrained=False, **kwargs)
    cfg = supernet.pretrained_cfg
    if subnet is None:
        model = supernet
        if pretrained:
            load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=supernet.in_chans,
                            filter_fn=checkpoint_filter_fn)
    else:
        resolved = supernet.resolve(subnet)
        model = supernet.extract(resolved)
        if pretrained:
            load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=supernet.in_chans,
                            filter_fn=partial(_subnet_filter, supernet=supernet, subnet=resolved))
    if features_only:
        cfg = pretrained_cfg_for_features(model.pretrained_cfg)
        if subnet is None:
            model = FeatureGetterNet(model, out_indices=out_indices, prune=False)
        else:
            model = FeatureListNet(model, out_indices=out_indices, **supernet.feature_cfg)
        model.pretrained_cfg = model.default_cfg = cfg
    return model


def _canonical_mbv3(width_mult: float, **kwargs: Any) -> nn.Module:
    return ofa_mobilenetv3(width_mult, **kwargs)


def _converted(source: str, **kwargs: Any) -> nn.Module:
    space_options = {k: kwargs.pop(k) for k in _SPACE_OPTIONS if k in kwargs}
    return elasticize(timm.create_model(source, pretrained=False, **kwargs), **space_options)


@register_model
def ofa_mbv3_w12(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """OFA MobileNetV3 supernet, width 1.2 (kernel {3,5,7}, expand {3,4,6}, depth {2,3,4})."""
    return create_ofa_model('ofa_mbv3_w12', partial(_canonical_mbv3, 1.2), pretrained, **kwargs)


@register_model
def ofa_mbv3_w10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """OFA MobileNetV3 supernet, width 1.0 (kernel {3,5,7}, expand {3,4,6}, depth {2,3,4})."""
    return create_ofa_model('ofa_mbv3_w10', partial(_canonical_mbv3, 1.0), pretrained, **kwargs)


@register_model
def ofa_mbv3(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """OFA MobileNetV3 supernet, the w1.2 default."""
    return create_ofa_model('ofa_mbv3', partial(_canonical_mbv3, 1.2), pretrained, **kwargs)


@register_model
def ofa_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """OFA-ResNet50 supernet (depth offsets {0,1,2}, expand {0.2,0.25,0.35}, width {0.65,0.8,1.0})."""
    return create_ofa_model('ofa_resnet50', build_ofa_resnet50, pretrained, **kwargs)


def _register_converted(name: str, source: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_ofa_model(name, partial(_converted, source), pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'Elastic supernet converted from timm `{source}`; its max subnet is `{source}`.'
    globals()[name] = register_model(entrypoint)


for _name, _source in _CONVERTED.items():
    _register_converted(_name, _source)
