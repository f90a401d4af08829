"""timm registry entrypoints: every OFA supernet and subnet is one ``timm.create_model`` call away.

After ``import ofa_timm``::

    timm.create_model('ofa_mbv3')                           # elastic supernet (trainable), canonical w1.2 space
    timm.create_model('ofa_mbv3', subnet='min')             # stock timm MobileNetV3 of the smallest subnet
    timm.create_model('ofa_mobilenetv3_large_100', pretrained=True, subnet='subnet.json')

``subnet`` takes ``None`` (the supernet), ``'max'``, ``'min'``, a ``Subnet``, a dict (ours or the reference
implementation's form) or the path of a subnet JSON file. Pretrained weights of a supernet (the published OFA
checkpoints, timm's weights of a converted source model, or this project's checkpoints) load into the supernet and
are then extracted; a checkpoint of the subnet itself (e.g. from ``save_for_hf``) loads directly. A subnet built here
also takes its supernet's state dict later (``checkpoint_path=``, ``timm.models.load_checkpoint``), and every route
loads the trained classifier exactly, or fails: it is never silently re-initialised.
"""
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models import (
    FeatureListNet, adapt_input_conv, build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, list_pretrained,
    load_state_dict_from_hf, register_model, resolve_pretrained_cfg)

from ofa_timm._io import load_weights, model_args_from_metadata
from ofa_timm._rng import preserved_rng
from ofa_timm._timm import (
    FeatureGetterNet, download_cached_file, pretrained_cfg_for_features, resolve_pretrained_source)
from ofa_timm.elastic import FAMILIES, elasticize
from ofa_timm.elastic.base import imagenet_cfg
from ofa_timm.elastic.mobilenetv3 import ofa_mobilenetv3
from ofa_timm.elastic.resnet import ofa_resnet50 as build_ofa_resnet50
from ofa_timm.space import Subnet, SubnetLike

__all__ = ['checkpoint_filter_fn', 'create_ofa_model']

_OFA_NETS_URL = 'https://raw.githubusercontent.com/han-cai/files/master/ofa/ofa_nets/'
# The reference downloads OFA-ResNet50 from Google Drive; pass pretrained_cfg_overlay=dict(file=...) if that fails.
_OFA_RESNET50_URL = 'https://drive.google.com/uc?id=1xy6VIPEHXqbbqNu3xEZUxhp5FbTVs5cQ'

# Converted supernets: registered name -> timm source model, for every model a family converts. Their weights are the
# source's own timm weights.
_CONVERTED = {f'ofa_{source}': source for family in FAMILIES for source in family.timm_sources}
# Keyword arguments that shape a converted supernet's space rather than the timm source model.
_SPACE_OPTIONS = frozenset(option for family in FAMILIES for option in family.space_options)
# Model kwargs of a checkpoint's metadata that apply to any registered model it is loaded into; the others apply to the
# model it was written for.
_GENERIC_ARGS = frozenset({'num_classes', 'in_chans', 'resolutions'})


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
    if not cfgs:  # no timm weights: still a registered (randomly initialised) supernet, with the source's layer names
        cfgs[name] = _cfg(**{k: getattr(default, k) for k in ('first_conv', 'classifier')} if default else {})
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


def checkpoint_filter_fn(
        state_dict: Mapping[str, Any], model: nn.Module, new_head: bool = False,
) -> Dict[str, torch.Tensor]:
    """Turn a checkpoint into a complete state dict for an ofa_timm supernet.

    Handles the reference implementation's checkpoints (current and legacy key names, wrapped in ``state_dict``),
    timm weights of a converted source model (kernel transforms missing: identity), and this project's checkpoints
    (wrapped in ``model`` / ``state_dict``, DDP prefixes). A first conv of another input-channel count is adapted as
    timm does, and a checkpoint without a classifier keeps the model's.

    Args:
        state_dict: The checkpoint.
        model: The supernet it is for.
        new_head: The caller chose ``num_classes``: a checkpoint classifier of another class count is replaced by the
            model's own (freshly initialised) one, as timm does. Without it such a classifier is an error, never a
            silent re-initialisation of trained weights.

    Raises:
        RuntimeError: On missing, unexpected or mis-shaped keys, or a classifier of another class count.
    """
    state_dict = _unwrap(state_dict)
    state_dict = model.convert_reference_state_dict(state_dict) or state_dict
    own = model.state_dict()
    out = _fit_head(model.complete_state(state_dict), model, own, new_head)
    first = f"{model.pretrained_cfg.get('first_conv', '')}.weight"
    if first in out and first in own and out[first].shape[1] != own[first].shape[1]:
        out[first] = adapt_input_conv(own[first].shape[1], out[first])
    _check_fits(out, own, model.pretrained_cfg.get('architecture', type(model).__name__))
    return out


def _head_keys(model: nn.Module) -> Tuple[str, str]:
    classifier = model.pretrained_cfg.get('classifier', 'classifier')
    return f'{classifier}.weight', f'{classifier}.bias'


def _fit_head(
        state: Dict[str, Any], model: nn.Module, own: Mapping[str, torch.Tensor], new_head: bool,
) -> Dict[str, Any]:
    """Keep a checkpoint classifier that fits the model; give the model's own one where there is none, or where the
    caller asked for another class count (``new_head``); anything else is an error."""
    if new_head:  # num_classes=0: a model without a classifier takes none
        for key in _head_keys(model):
            if key not in own:
                state.pop(key, None)
    keys = [k for k in _head_keys(model) if k in own]
    # Another class count; a classifier over other features is another architecture (_check_fits names it)
    unfit = [k for k in keys if k in state and state[k].shape[:1] != own[k].shape[:1]]
    if unfit and not new_head:
        found = state[unfit[0]].shape[0]
        name = model.pretrained_cfg.get('architecture', type(model).__name__)
        raise RuntimeError(
            f'The checkpoint classifier of {name} has {found} classes and the model {model.num_classes}: pass '
            f'num_classes={found} to keep the trained classifier, or set num_classes explicitly for a new one')
    for key in keys:
        if key not in state or key in unfit:
            state[key] = own[key]
    return state


def _check_fits(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise a RuntimeError naming missing, unexpected and mis-shaped keys (up to 10 of each)."""
    def listed(keys: list) -> str:
        return f'{keys[:10]}{f" and {len(keys) - 10} more" if len(keys) > 10 else ""}'

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f'Checkpoint does not fit {name}: missing keys {listed(missing)}, unexpected keys {listed(unexpected)}, '
            f'shape mismatches {listed(mismatched)}')


def _subnet_state(state_dict: Mapping[str, Any], model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """``state_dict`` if it holds the extracted ``model``'s own weights (e.g. a ``save_for_hf`` export), else None.
    The classifier may differ (the head policy of :func:`_fit_head` applies)."""
    flat = _unwrap(state_dict)
    own = model.state_dict()
    head = set(_head_keys(model))
    if flat.keys() != own.keys() or any(flat[k].shape != own[k].shape for k in own if k not in head):
        return None
    return flat


class _LoadSupernetState:
    """``load_state_dict`` pre-hook of a subnet built through the registry: a state dict of its supernet loads too.

    ``timm.create_model(name, subnet=..., checkpoint_path=...)``, ``timm.models.load_checkpoint(subnet_model, ...)``
    and timm's ``train.py --initial-checkpoint`` all end in ``load_state_dict`` on the extracted subnet. Given weights
    of the supernet (this project's checkpoints, timm weights of the source model, a reference OFA checkpoint), the
    hook rebuilds the supernet, loads them and puts the subnet's extracted state in their place, so the subnet gets
    exactly ``supernet.extract(subnet)``'s weights. The subnet's own state (also a subset of it) passes unchanged.
    The hook holds a builder, not a supernet, so a subnet costs no memory for it.
    """

    def __init__(self, build_supernet: Callable[[], nn.Module], subnet: Subnet):
        self.build_supernet = build_supernet
        self.subnet = subnet

    def __call__(
            self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict[str, Any],
            strict: bool, missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str],
    ) -> None:
        own = module.state_dict()
        local = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
        if all(getattr(state_dict[key], 'shape', None) == getattr(own.get(name), 'shape', None)
               for name, key in local.items()):
            return
        try:
            with preserved_rng():  # loading weights leaves the caller's random state alone
                supernet = self.build_supernet()
                supernet.load_state_dict(checkpoint_filter_fn({n: state_dict[k] for n, k in local.items()}, supernet))
                converted = supernet.extract(self.subnet).state_dict()
        except (RuntimeError, ValueError) as e:
            # ``strict`` always reads True here (torch passes it so to every module), so tell a whole checkpoint,
            # which must fit, from a partial one, which load_state_dict(strict=False) takes as far as it fits.
            if all(name in local for name in own):
                error_msgs.append(str(e))  # load_state_dict raises it, in place of a hundred size mismatches
                converted = own
            else:
                return
        for key in _head_keys(module):
            if key not in local:  # e.g. dropped by timm for a new class count: the subnet keeps its own
                converted.pop(key, None)
        for key in local.values():
            del state_dict[key]
        state_dict.update({prefix + k: v for k, v in converted.items()})


# --- pretrained weights ---------------------------------------------------------------------------------------------
def _pretrained_state(
        variant: str, cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]] = None,
) -> Tuple[Mapping[str, Any], Dict[str, str]]:
    """The weights ``cfg`` points at (a state dict, file, local-dir, URL or Hugging Face hub) and their metadata.

    Raises:
        ValueError: For an unreadable file (see ``ofa_timm._io.load_weights``).
        ConnectionError: When a download fails; the message names the URL and the offline route.
    """
    load_from, location = resolve_pretrained_source(cfg)
    if load_from == 'state_dict':
        return location, {}
    if load_from == 'file':
        return load_weights(location)
    if load_from == 'local-dir':
        folder = Path(location)
        for name in ('model.safetensors', 'pytorch_model.bin'):
            if (folder / name).is_file():
                return load_weights(folder / name)
        raise ValueError(f"No weights file (model.safetensors or pytorch_model.bin) in '{folder}'")
    if load_from not in ('url', 'hf-hub'):
        raise RuntimeError(f'No pretrained weights exist for {variant}. Use `pretrained=False` for random init, or '
                           f"pretrained_cfg_overlay=dict(file='/path/to/weights') for a local file.")
    if load_from == 'url':
        where = location
    else:
        model_id, filename = location if isinstance(location, (tuple, list)) else (location, None)
        where = f'https://huggingface.co/{model_id}'
    try:
        if load_from == 'hf-hub':
            extra = {'filename': filename} if filename else {}
            return load_state_dict_from_hf(model_id, cache_dir=cache_dir, **extra), {}
        path = download_cached_file(location, check_hash=False, cache_dir=cache_dir)
    except Exception as e:  # URLError, socket and HTTP errors, hub errors: any failure to fetch
        reason = (str(e).strip().splitlines() or ['no details'])[0]
        hub = '; HF_HUB_OFFLINE=1 uses a copy in the Hugging Face cache, without retries' * (load_from == 'hf-hub')
        raise ConnectionError(
            f'Cannot download the pretrained weights of {variant} from {where} ({type(e).__name__}: {reason}). '
            f'Offline, fetch the file elsewhere and load it from disk: timm.create_model({variant!r}, '
            f"pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/weights'))"
            f'{hub}') from None
    return load_weights(path)


# --- model creation -------------------------------------------------------------------------------------------------
def create_ofa_model(
        variant: str,
        build_supernet: Callable[..., nn.Module],
        pretrained: bool = False,
        subnet: Optional[SubnetLike] = None,
        **kwargs: Any,
) -> nn.Module:
    """Build a registered supernet, load its weights, and optionally extract a subnet as a stock timm model.

    Weights load exactly, classifier included: a checkpoint written by this project carries its model kwargs
    (``num_classes``, ``resolutions``, ...), which apply where the call does not set them; a classifier of another
    class count is replaced only when ``num_classes`` is passed, and is an error otherwise. An extracted subnet also
    loads a state dict of its supernet later (``checkpoint_path=``, ``timm.models.load_checkpoint``).

    Args:
        variant: Registered model name.
        build_supernet: Returns the (randomly initialised) supernet from model kwargs.
        pretrained: Load the pretrained weights of ``pretrained_cfg`` (URL, hub, file or local-dir).
        subnet: None for the supernet, else ``'max'``, ``'min'``, a ``Subnet``, a dict or a JSON path.
        **kwargs: Model kwargs (``num_classes``, ``in_chans``, ``drop_rate``, space options, ``features_only``...).
    """
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', None)
    kwargs.pop('feature_cls', None)
    new_head = 'num_classes' in kwargs
    state = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        state, metadata = _pretrained_state(variant, cfg.to_dict(), kwargs.get('cache_dir'))
        model_args = model_args_from_metadata(metadata)
        same_model = metadata.get('model') == variant
        for key, value in model_args.items():
            if same_model or key in _GENERIC_ARGS:
                kwargs.setdefault(key, value)  # the checkpoint's own model kwargs, where the call sets none
    supernet = build_model_with_cfg(build_supernet, variant, pretrained=False, **kwargs)
    if subnet is None:
        model = supernet
        if state is not None:
            supernet.load_state_dict(checkpoint_filter_fn(state, supernet, new_head))
    else:
        resolved = supernet.resolve(subnet)
        model = supernet.extract(resolved)
        if state is not None:
            own_state = _subnet_state(state, model)
            if own_state is not None:
                model.load_state_dict(_fit_head(own_state, model, model.state_dict(), new_head))
            else:
                supernet.load_state_dict(checkpoint_filter_fn(state, supernet, new_head))
                model = supernet.extract(resolved)
        if not features_only:
            arch = {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_cfg_overlay')}
            arch.update(num_classes=supernet.num_classes, in_chans=supernet.in_chans)
            hook = _LoadSupernetState(
                partial(build_model_with_cfg, build_supernet, variant, pretrained=False, **arch), resolved)
            if hasattr(model, 'register_load_state_dict_pre_hook'):
                model.register_load_state_dict_pre_hook(hook)
            else:  # torch < 2.5: the same hook, registered privately
                model._register_load_state_dict_pre_hook(hook, with_module=True)
    # The model kwargs it was built with, the checkpoint's included: timm.create_model keeps them on the model (and
    # adds the call's), so that save_for_hf and this project's checkpoints record what rebuilds it.
    model._model_args = {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_cfg_overlay',
                                                                      'cache_dir')}
    if features_only:
        cfg = pretrained_cfg_for_features(model.pretrained_cfg)
        feature_cfg = dict(supernet.feature_cfg)
        getter = feature_cfg.pop('feature_cls', None) == 'getter'  # timm's choice for the source class
        if out_indices is None:
            out_indices = supernet.default_out_indices(supernet.space.max() if subnet is None else resolved)
        if subnet is None or getter:
            model = FeatureGetterNet(model, out_indices=out_indices, prune=False)
        else:
            model = FeatureListNet(model, out_indices=out_indices, **feature_cfg)
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
