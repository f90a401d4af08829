"""INT8 subnets: a QDQ ONNX graph of an extracted subnet, quantized by ONNX Runtime on the user's own training images,
checked against its float graph, and run for accuracy and latency.

Phones, NPUs and edge accelerators run quantized graphs: ONNX Runtime's QNN HTP backend runs only QDQ graphs, NNAPI
and TensorRT deployments run INT8. :func:`quantize_onnx` turns a float ONNX graph into a QDQ one with
``onnxruntime.quantization.quantize_static``: weights per channel, activations calibrated on training images (never
the validation or test split). :func:`compare_graphs` measures how far the INT8 graph is from the float one on real
images, and :class:`OnnxClassifier` runs either on a data loader, for an accuracy measured as the device computes it.

    fp32 = export_onnx(model, 'model.onnx', resolution=224)
    quantize_onnx(fp32, 'model_int8.onnx', calibration_batches(loader, 256, 224), QuantizeConfig())
    compare_graphs('model.onnx', 'model_int8.onnx', check_images)   # {'top1_agreement': 99.2, ...}
"""
import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = ['PRECISIONS', 'QuantizeConfig', 'quantize_onnx', 'onnx_bytes', 'export_onnx', 'calibration_batches',
           'compare_graphs', 'OnnxClassifier', 'cpu_session', 'quantized_classifier', 'quantize_for_timing',
           'require_quantization']

PRECISIONS: Tuple[str, ...] = ('fp32', 'int8')
_METHODS = ('percentile', 'minmax', 'entropy')
_ACTIVATIONS = ('uint8', 'int8')


@dataclass(frozen=True)
class QuantizeConfig:
    """How a float graph becomes an INT8 one.

    The defaults were chosen on a validation split (``benchmarks/int8.py accuracy``, ``docs/search.md``): the global
    min and max over all calibration images is set by a few outlier activations and cost MobileNetV3 subnets 6-20
    points of top-1; clipping the activation ranges at the 99.99th percentile kept them within a point of FP32.

    Args:
        calibration_images: Training images the activation ranges are calibrated on.
        method: ``'percentile'`` (ranges clipped at ``percentile``), ``'minmax'`` (the extremes seen) or
            ``'entropy'`` (ONNX Runtime's calibration methods).
        activations: ``'uint8'`` (what NPUs such as Qualcomm's HTP and NNAPI take, and ONNX Runtime's CPU runs too)
            or ``'int8'`` (S8S8, which ONNX Runtime recommends on x86 CPUs); both asymmetric, with a zero point,
            since most activations follow a ReLU or a hard-swish and a symmetric range would waste half of the 256
            levels on them. Latency tables and kits time ``'uint8'`` graphs.
        per_channel: One weight scale per output channel (else one per tensor); weights are symmetric INT8.
        percentile: The percentile of ``'percentile'``.
    """
    calibration_images: int = 256
    method: str = 'percentile'
    activations: str = 'uint8'
    per_channel: bool = True
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ValueError(f'calibration_images must be >= 1, got {self.calibration_images}')
        if self.method not in _METHODS:
            raise ValueError(f'Unknown calibration method {self.method!r}; allowed: {list(_METHODS)}')
        if self.activations not in _ACTIVATIONS:
            raise ValueError(f'Unknown activation type {self.activations!r}; allowed: {list(_ACTIVATIONS)}')
        if not 50 < self.percentile <= 100:
            raise ValueError(f'percentile must be in (50, 100], got {self.percentile}')

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def require_quantization() -> Any:
    """``onnxruntime.quantization``, or a ValueError saying what to install."""
    try:
        import onnx  # noqa: F401  the quantizer reads and writes graphs through it
        from onnxruntime import quantization
    except ImportError as e:
        raise ValueError(f'INT8 needs onnx and onnxruntime with its quantization tools ({e}): '
                         f'pip install "ofa-timm[onnx]"') from None
    return quantization


def onnx_bytes(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = False, opset: int = 17) -> bytes:
    """``module`` as a float ONNX graph (input ``input``, output ``output``)."""
    buffer = io.BytesIO()
    axes = {'input': {0: 'batch'}, 'output': {0: 'batch'}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=['input'], output_names=['output'], dynamic_axes=axes)
    return buffer.getvalue()


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], resolution: int, in_chans: int = 3) -> Path:
    """Write ``model`` (an extracted subnet) as a float ONNX graph with a dynamic batch."""
    example = torch.zeros(1, in_chans, resolution, resolution)
    Path(path).write_bytes(onnx_bytes(model, example, dynamic_batch=True))
    return Path(path)


def calibration_batches(loader: Iterable, images: int, resolution: Optional[int] = None) -> List[np.ndarray]:
    """The first ``images`` images of ``loader`` (batches or ``(images, targets)``), resized to ``resolution``, as
    float32 arrays: what :func:`quantize_onnx` calibrates on.

    Raises:
        ValueError: If the loader gives no image.
    """
    from ..training.data import resize_to
    out, seen = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = resize_to(x[:images - seen], resolution)
        out.append(x.numpy().astype(np.float32))
        seen += x.shape[0]
        if seen >= images:
            break
    if not seen:
        raise ValueError('The calibration data has no images: INT8 calibration reads training images')
    return out


class _Reader:
    """The ``CalibrationDataReader`` ONNX Runtime's quantizer pulls batches from."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str):
        self._batches = iter(batches)
        self._input = input_name

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}

    def rewind(self) -> None:  # the quantizer may ask; one pass is all it needs
        pass


def quantize_onnx(model: Union[bytes, str, os.PathLike], out: Union[str, os.PathLike],
                  batches: Sequence[np.ndarray], config: QuantizeConfig = QuantizeConfig()) -> Path:
    """Quantize a float ONNX graph to a QDQ one: weights per channel, activations calibrated on ``batches``.

    Args:
        model: The float graph (bytes or a file).
        out: Where the INT8 graph is written.
        batches: Calibration inputs (training images, at the graph's input size).
        config: Calibration size and method, activation type, per-channel weights.

    Raises:
        ValueError: If onnxruntime cannot quantize (not installed, or the graph has what its quantizer refuses).
    """
    q = require_quantization()
    import onnx
    if not batches:
        raise ValueError('INT8 calibration needs at least one batch of training images')
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    method = {'minmax': q.CalibrationMethod.MinMax, 'entropy': q.CalibrationMethod.Entropy,
              'percentile': q.CalibrationMethod.Percentile}[config.method]
    activation = q.QuantType.QInt8 if config.activations == 'int8' else q.QuantType.QUInt8
    extra = dict(ActivationSymmetric=False, WeightSymmetric=True)
    if config.method == 'percentile':
        extra['CalibPercentile'] = config.percentile
    with tempfile.TemporaryDirectory() as tmp:
        src, pre = Path(tmp) / 'model.onnx', Path(tmp) / 'pre.onnx'
        onnx.save(proto, str(src))
        try:
            # the histogram calibrators print their progress: keep the user's output to ours
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter('ignore')
                q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                q.quantize_static(
                    str(pre), str(out), _Reader(batches, proto.graph.input[0].name), quant_format=q.QuantFormat.QDQ,
                    per_channel=config.per_channel, activation_type=activation, weight_type=q.QuantType.QInt8,
                    calibrate_method=method, extra_options=extra)
        except Exception as e:  # the quantizer raises many types, all of them about the graph or the install
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            if config.method != 'minmax' and 'bins' in first:
                # a histogram cannot span a tensor whose values all but coincide (numpy: too many bins for the
                # range); the extremes can, and for such a tensor they lose nothing
                warnings.warn(f'{config.method} calibration cannot histogram a near-constant activation ({first}); '
                              f'calibrating with minmax instead')
                return quantize_onnx(model, out, batches, replace(config, method='minmax'))
            raise ValueError(f'onnxruntime {_version()} cannot quantize this graph: {type(e).__name__}: {first}') \
                from None
    return Path(out)


#: The INT8 graphs that latency tables and kits time: the default activation type, ranges from random inputs (an
#: integer kernel's speed does not depend on the ranges, and min/max needs no histogram).
TIMING_CONFIG = QuantizeConfig(calibration_images=2, method='minmax')


def quantize_for_timing(graph: bytes, input_shape: Sequence[int]) -> bytes:
    """The QDQ graph of ``graph`` (a float ONNX graph) that a latency table or kit times, as bytes."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(*input_shape, generator=g).numpy() for _ in range(TIMING_CONFIG.calibration_images)]
    with tempfile.TemporaryDirectory() as tmp:
        return quantize_onnx(graph, Path(tmp) / 'int8.onnx', batches, TIMING_CONFIG).read_bytes()


def _version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def cpu_session(model: Union[bytes, str, os.PathLike], threads: Optional[int] = None, timing: bool = False) -> Any:
    """An ONNX Runtime session on the CPU provider, quiet. With ``timing``, one of several sessions timed in turn:
    its idle threads do not spin, or they would take the cores of the next session timed."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if timing:
        options.inter_op_num_threads = 1
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=['CPUExecutionProvider'])


class OnnxClassifier:
    """An ONNX classifier run by ONNX Runtime's CPU provider, fed like a PyTorch model: for an accuracy measured as
    the deployed graph computes it.

    Args:
        model: The graph (bytes or a file).
        threads: Intra-op threads (default: ONNX Runtime's).
    """

    def __init__(self, model: Union[bytes, str, os.PathLike], threads: Optional[int] = None):
        self.session = cpu_session(model, threads)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: images.detach().cpu().numpy()})[0])


def quantized_classifier(model: nn.Module, calib_loader: Iterable, resolution: int,
                         config: QuantizeConfig = QuantizeConfig(), in_chans: int = 3) -> OnnxClassifier:
    """``model`` (an extracted, BN-recalibrated subnet) as the INT8 graph a device runs: exported, quantized with
    activations calibrated on ``config.calibration_images`` images of ``calib_loader`` (training images), and run by
    ONNX Runtime."""
    graph = onnx_bytes(model.cpu(), torch.zeros(1, in_chans, resolution, resolution), dynamic_batch=True)
    batches = calibration_batches(calib_loader, config.calibration_images, resolution)
    with tempfile.TemporaryDirectory() as tmp:
        return OnnxClassifier(quantize_onnx(graph, Path(tmp) / 'int8.onnx', batches, config).read_bytes())


def compare_graphs(fp32: Union[bytes, str, os.PathLike], int8: Union[bytes, str, os.PathLike],
                   batches: Iterable[np.ndarray]) -> Dict[str, float]:
    """How far the INT8 graph's outputs are from the float graph's on ``batches`` (real images): the share of images
    whose top-1 class agrees (%), and the mean and largest absolute logit difference relative to the float logits'
    scale.

    Raises:
        ValueError: If ``batches`` is empty.
    """
    a, b = OnnxClassifier(fp32), OnnxClassifier(int8)
    agree = total = 0
    diffs, scales = [], []
    for batch in batches:
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32))
        ya, yb = a(x), b(x)
        agree += int((ya.argmax(1) == yb.argmax(1)).sum())
        total += x.shape[0]
        diffs.append((ya - yb).abs())
        scales.append(ya.abs().max())
    if not total:
        raise ValueError('compare_graphs needs at least one batch of images')
    scale = float(max(scales)) or 1.0
    diff = torch.cat([d.flatten() for d in diffs])
    return dict(images=total, top1_agreement=100.0 * agree / total, mean_abs_diff=float(diff.mean()) / scale,
                max_abs_diff=float(diff.max()) / scale)
