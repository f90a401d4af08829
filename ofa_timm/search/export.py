"""Deployable subnets: load a trained supernet, extract a subnet, and write it as timm / safetensors / ONNX / pt2.

Every export is written to a staging folder next to the destination and moved into place only when complete and
checked (ONNX against ONNX Runtime, pt2 against eager PyTorch), so a failure never leaves a partial model behind.

    supernet = load_supernet('ofa_mobilenetv3_large_100', 'run/supernet.safetensors')
    export_subnet(supernet, 'subnet.json', 'deploy/', formats=('timm', 'onnx'))
    timm.create_model('local-dir:deploy/', pretrained=True)      # after `import ofa_timm`
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

import torch
import torch.nn as nn

from .._io import load_weights, staged_folder, supernet_model_args
from .quantize import (
    QuantizeConfig, calibration_batches, compare_graphs, onnx_bytes, quantize_onnx, require_quantization)
from ..space import SearchSpace, SubnetLike

__all__ = ['EXPORT_FORMATS', 'load_supernet', 'export_subnet']

EXPORT_FORMATS = ('timm', 'safetensors', 'onnx', 'onnx-int8', 'pt2')


def _checkpoint_facts(checkpoint: str, model: str) -> Dict[str, Any]:
    """The space stored in a checkpoint's metadata and its number of classes, where they can be read: from the
    metadata of this project's checkpoints, from the classifier of timm weights, or from the classifier of a reference
    checkpoint as the family maps its keys."""
    import timm
    from timm.models import get_pretrained_cfg
    facts: Dict[str, Any] = {}
    state, metadata = load_weights(checkpoint)  # a ValueError naming the file on a damaged one
    if metadata.get('space'):
        facts['space'] = SearchSpace.from_dict(json.loads(metadata['space']))
    if metadata.get('num_classes'):
        facts['num_classes'] = int(metadata['num_classes'])
        return facts
    for wrapper in ('state_dict', 'model'):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    cfg = get_pretrained_cfg(model)
    key = f"{cfg.classifier if cfg is not None else 'classifier'}.weight"
    if key not in state:  # the reference implementation's layout, as the family reads it
        state = timm.create_model(model).convert_reference_state_dict(state) or state
    if getattr(state.get(key), 'dim', lambda: 0)() == 2:
        facts['num_classes'] = int(state[key].shape[0])
    return facts


def load_supernet(
        model: str,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        num_classes: Optional[int] = None,
        resolutions: Optional[Sequence[int]] = None,
        pretrained: bool = False,
        pretrained_file: Optional[Union[str, os.PathLike]] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """A registered supernet (``import ofa_timm`` first), by name: the one way the command line, the pipeline and the
    search build one. Trained weights bring their space and class count; starting weights keep those of the call.

    Args:
        model: Registered ``ofa_*`` name.
        checkpoint: Trained weights: ``supernet.safetensors`` of ``ofa-timm train`` (its metadata gives the
            resolutions), a timm checkpoint of the source model, or a reference OFA checkpoint.
        num_classes: Classes (default: read from the checkpoint's classifier, else the model's default). A start from
            ``pretrained`` weights of another class count gets a new classifier.
        resolutions: Elastic resolutions (default: the checkpoint's space, else the model's default).
        pretrained: Start from the name's pretrained weights (when no checkpoint is given).
        pretrained_file: Start from these local weights (timm weights of the source model, a reference or this
            project's checkpoint) instead of downloading the name's.
        model_kwargs: Arguments of the source model or the space (``depth=6, img_size=32, patch_size=4`` for a small
            vision transformer; ``resolutions`` and ``num_classes`` have their own arguments). A checkpoint of this
            project brings the ones it was trained with.

    Raises:
        ValueError: On an unknown name, a missing or unreadable checkpoint, or a checkpoint of another model or
            space.
    """
    import timm
    if not timm.is_model(model) or not model.startswith('ofa_'):
        raise ValueError(f"--model must be a registered ofa_* name (see timm.list_models('ofa_*')), got {model!r}")
    kwargs: Dict[str, Any] = dict(model_kwargs or {})
    stored_space = None
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if not os.path.isfile(checkpoint):
            raise ValueError(f'Checkpoint {checkpoint!r} does not exist')
        facts = _checkpoint_facts(checkpoint, model)
        stored_space = facts.get('space')
        if num_classes is None and 'num_classes' in facts:
            num_classes = facts['num_classes']
        if resolutions is None and stored_space is not None and stored_space.resolutions:
            resolutions = stored_space.resolutions
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    elif pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise ValueError(f'Pretrained file {os.fspath(pretrained_file)!r} does not exist')
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.fspath(pretrained_file)))
    else:
        kwargs['pretrained'] = pretrained
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
        if checkpoint is not None:  # else timm's loader drops a classifier whose class count differs from the cfg's
            kwargs['pretrained_cfg_overlay']['num_classes'] = num_classes
    if resolutions:
        kwargs['resolutions'] = tuple(resolutions)
    try:
        supernet = timm.create_model(model, **kwargs)
    except RuntimeError as e:  # the registry's checkpoint filter names missing/unexpected/mis-shaped keys
        weights = checkpoint or pretrained_file or f"{model}'s pretrained weights"
        raise ValueError(f'{os.fspath(weights)!r} does not fit {model}: {e}') from None
    if stored_space is not None and stored_space != supernet.space:
        raise ValueError(f'Checkpoint {checkpoint!r} was trained on another space than {model} has '
                         f'(pass the resolutions it was trained with)')
    return supernet.eval()


def _max_abs_diff(a: Any, b: torch.Tensor) -> float:
    return float((torch.as_tensor(a).float() - b.float()).abs().max())


@torch.no_grad()
def export_subnet(
        supernet: nn.Module,
        subnet: SubnetLike,
        out: Union[str, os.PathLike],
        formats: Iterable[str] = ('timm',),
        calib_loader: Optional[Iterable] = None,
        calib_images: int = 2000,
        model_name: str = '',
        batch_size: int = 1,
        tolerance: float = 1e-4,
        quantize: QuantizeConfig = QuantizeConfig(),
        check_loader: Optional[Iterable] = None,
) -> Dict[str, Any]:
    """Extract ``subnet`` and write it to the folder ``out`` in each of ``formats``.

    * ``timm``: a ``save_for_hf`` folder (``config.json``, ``model.safetensors``) that
      ``timm.create_model('local-dir:OUT', pretrained=True)`` rebuilds after ``import ofa_timm``;
    * ``safetensors``: ``model.safetensors`` (subnet and model name in its metadata) for
      ``timm.create_model(name, subnet=..., num_classes=N, pretrained=True,
      pretrained_cfg_overlay=dict(file=..., num_classes=N))``;
    * ``onnx``: ``model.onnx`` (dynamic batch), checked against ONNX Runtime;
    * ``onnx-int8``: ``model_int8.onnx``, the QDQ graph of ``onnxruntime.quantization`` (static: per-channel int8
      weights, activations calibrated on ``quantize.calibration_images`` images of ``calib_loader``), checked
      against the float graph on real images (``check_loader``, default: the next images of ``calib_loader``);
    * ``pt2``: ``model.pt2`` from ``torch.export``, checked against eager PyTorch.

    ``subnet.json`` is always written.

    Args:
        supernet: The trained supernet.
        subnet: Any form ``supernet.resolve`` reads.
        out: Destination folder (created; files of the same names are replaced).
        formats: Subset of :data:`EXPORT_FORMATS`.
        calib_loader: Training images to recalibrate the subnet's batch norms on first (recommended after
            progressive shrinking); None keeps the supernet's statistics.
        calib_images: Images for the recalibration.
        model_name: Registered name recorded for timm (default: the supernet's architecture).
        batch_size: Batch of the example input (the pt2 graph is specialised to it).
        tolerance: Largest max-abs difference, relative to the output scale, the ONNX / pt2 check accepts.
        quantize: Calibration size and method of ``onnx-int8``.
        check_loader: Images the INT8 graph is compared with the float graph on (default: those of ``calib_loader``
            after the calibration images).

    Returns:
        ``{'subnet', 'files', 'onnx_max_abs_diff'?, 'pt2_max_abs_diff'?, 'int8'?}``; ``int8`` is
        :func:`~ofa_timm.search.quantize.compare_graphs`' agreement of the INT8 graph with the float one.

    Raises:
        ValueError: On a subnet outside the space, an unknown format, an unwritable folder, a failed check, or
            ``onnx-int8`` without training images or an onnxruntime that quantizes.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f'Unknown export format(s) {unknown}; allowed: {list(EXPORT_FORMATS)}')
    subnet = supernet.resolve(subnet)
    model_name = model_name or supernet.pretrained_cfg.get('architecture', '')
    out = Path(out)
    if 'onnx' in formats or 'onnx-int8' in formats:
        _require_onnx()
    if 'onnx-int8' in formats:
        require_quantization()
        if calib_loader is None:
            raise ValueError('onnx-int8 calibrates its activations on training images: pass calib_loader '
                             '(--calibrate-bn DIR on the command line)')
    model = supernet.extract(subnet).eval()
    if calib_loader is not None:
        from ..training import calibrate_bn
        calibrate_bn(model, calib_loader, calib_images, resolution=subnet.resolution)
        model.eval()
    resolution = supernet.resolution_of(subnet)
    x = torch.randn(batch_size, supernet.in_chans, resolution, resolution, generator=torch.Generator().manual_seed(0))
    reference = model(x)
    scale = max(1.0, float(reference.abs().max()))
    result: Dict[str, Any] = dict(subnet=subnet, files=[])
    with staged_folder(out) as staging:
        subnet.to_json(staging / 'subnet.json')
        if 'timm' in formats:
            from timm.models import save_for_hf
            model_args = dict(supernet_model_args(supernet), subnet=subnet.to_dict())
            if not supernet.space.resolutions:
                model_args.pop('resolutions')
            model.pretrained_cfg = dict(model.pretrained_cfg, architecture=model_name)
            save_for_hf(model, str(staging), model_args=model_args, safe_serialization=True)
        if 'safetensors' in formats:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / 'model.safetensors'),
                      metadata=dict(model=model_name, subnet=json.dumps(subnet.to_dict()),
                                    num_classes=str(supernet.num_classes)))
        if 'onnx' in formats:
            ort = _require_onnx()
            path = staging / 'model.onnx'
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['input'],
                                  output_names=['logits'], dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
            session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
            diff = _max_abs_diff(session.run(None, {'input': x.numpy()})[0], reference)
            result['onnx_max_abs_diff'] = diff
            if diff > tolerance * scale:
                raise ValueError(f'The ONNX model differs from PyTorch by {diff:.3g} (max abs) on a random input')
        if 'onnx-int8' in formats:
            graph = onnx_bytes(model, x[:1], dynamic_batch=True)
            batches = calibration_batches(calib_loader, quantize.calibration_images, subnet.resolution)
            quantize_onnx(graph, staging / 'model_int8.onnx', batches, quantize)
            check = calibration_batches(check_loader, 256, subnet.resolution) if check_loader is not None else \
                _after(calib_loader, quantize.calibration_images, 256, subnet.resolution) or batches
            result['int8'] = compare_graphs(graph, staging / 'model_int8.onnx', check)
        if 'pt2' in formats:
            program = torch.export.export(model, (x,))
            path = staging / 'model.pt2'
            torch.export.save(program, str(path))
            diff = _max_abs_diff(torch.export.load(str(path)).module()(x), reference)
            result['pt2_max_abs_diff'] = diff
            if diff > tolerance * scale:
                raise ValueError(f'The torch.export program differs from eager PyTorch by {diff:.3g} (max abs)')
        result['files'] = sorted(str(out / p.name) for p in staging.iterdir())
    return result


def _after(loader: Iterable, skip: int, images: int, resolution: Optional[int]) -> List[Any]:
    """Up to ``images`` images of ``loader`` after its first ``skip`` (empty if it has no more)."""
    batches = calibration_batches(loader, skip + images, resolution) if images else []
    flat = np.concatenate(batches) if batches else np.zeros((0,))
    rest = flat[skip:]
    return [rest[i:i + 64] for i in range(0, len(rest), 64)]


def _require_onnx() -> Any:
    try:
        import onnx  # noqa: F401  torch.onnx.export writes through it
        import onnxruntime
    except ImportError:
        raise ValueError('ONNX export needs onnx and onnxruntime: pip install "ofa-timm[onnx]"') from None
    return onnxruntime
