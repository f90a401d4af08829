"""Latency on a device where PyTorch cannot run: a kit to measure there with onnxruntime alone, and the import of
what it measured as a :class:`~ofa_timm.search.LatencyTable`.

:func:`make_kit` writes a folder with an ONNX graph for every entry of the space's latency table (each distinct block
computation at each input size the resolutions give, the stem and the head included), the calibration subnets and
held-out validation subnets as whole ONNX graphs, a ``manifest.json`` (the space, the table's layout, every model's
input shape and checksum) and ``measure.py``, one file that needs only Python >= 3.8, numpy and onnxruntime. The graphs
carry no weights: ``measure.py`` draws them on the device (each tensor's value range is in the manifest), so the kit
stays small and carries nothing of a trained supernet.

:func:`import_kit_results` reads the ``results.json`` that ``measure.py`` wrote and builds the table: block entries
from the block models, the calibration fit from the calibration subnets, the error from the validation subnets.

    make_kit(supernet, 'kit/', batch_size=1)              # ofa-timm latency kit --model ... --out kit/
    # on the device: python measure.py [--provider cuda] [--threads 4]; later python measure.py --part validation
    table = import_kit_results('kit/results.json')        # ofa-timm latency import kit/results.json --out t.json
"""
import datetime
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..._io import staged_folder
from ...space import Subnet
from ..cost import BlockLayout
from ..quantize import PRECISIONS, onnx_bytes, quantize_for_timing, require_quantization
from ..latency import (
    LatencySettings, LatencyTable, calibration_subnets, entry_modules, held_out_subnets, plan_entries,
    score_predictions, subnet_input_shape, with_calibration)
from . import measure as _format  # the results format and its checks live in the standalone script

__all__ = ['make_kit', 'import_kit_results', 'KIT_FORMAT', 'RESULTS_FORMAT']

KIT_FORMAT = _format.KIT_FORMAT
RESULTS_FORMAT = _format.RESULTS_FORMAT
_INLINE_BELOW = 64  # float tensors smaller than this stay in the graph with their values (constants, tiny norms)
_ALIGN = 64


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ValueError('Making a latency kit needs onnx: pip install "ofa-timm[onnx]"') from None
    return onnx


def _export_graph(module: nn.Module, input_shape: Sequence[int], path: Path, opset: int,
                  precision: str = 'fp32') -> Dict[str, Any]:
    """Write ``module`` as an ONNX graph (a QDQ one for ``precision`` ``'int8'``) whose weights are external data
    that ``measure.py`` draws; return the weights' layout, dtype and value ranges."""
    onnx = _require_onnx()
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    graph = onnx_bytes(module, x, opset=opset)
    if precision == 'int8':
        graph = quantize_for_timing(graph, input_shape)
    model = onnx.load_from_string(graph)
    weights_file = path.stem + '.weights'
    drawn = {onnx.TensorProto.FLOAT: ('float32', np.float32), onnx.TensorProto.INT8: ('int8', np.int8)}
    # scales and zero points of (De)QuantizeLinear stay in the graph: drawn at random they would be invalid
    quant_params = {name for node in model.graph.node if node.op_type in ('QuantizeLinear', 'DequantizeLinear')
                    for name in node.input[1:]}
    tensors, offset = [], 0
    for init in model.graph.initializer:
        if init.data_type not in drawn or init.name in quant_params:
            continue
        dtype, numpy_type = drawn[init.data_type]
        values = numpy_helper.to_array(init).astype(numpy_type)
        if values.size < _INLINE_BELOW:  # scales, zero points, small biases stay in the graph
            continue
        offset = -(-offset // _ALIGN) * _ALIGN
        v = values.astype(np.float64)
        tensors.append(dict(name=init.name, shape=list(values.shape), offset=offset, length=int(values.nbytes),
                            dtype=dtype, mean=float(v.mean()), std=float(v.std()), min=float(v.min()),
                            max=float(v.max())))
        set_external_data(init, location=weights_file, offset=offset, length=int(values.nbytes))
        init.ClearField('raw_data')
        init.ClearField('float_data')
        init.ClearField('int32_data')
        init.data_location = onnx.TensorProto.EXTERNAL
        offset += int(values.nbytes)
    path.write_bytes(model.SerializeToString())
    return dict(file=weights_file, size=offset, tensors=tensors) if tensors else {}


def make_kit(
        supernet: nn.Module,
        out: Union[str, os.PathLike],
        batch_size: int = 1,
        calibrate: int = 10,
        validate: int = 30,
        seed: int = 0,
        model: str = '',
        opset: int = 17,
        progress: bool = True,
        precision: str = 'fp32',
) -> Path:
    """Write a latency kit for ``supernet``'s space into the folder ``out`` (replaced only once complete).

    Args:
        supernet: The supernet; only its architecture matters (the graphs carry no weights).
        out: The kit folder.
        batch_size: Images per forward pass on the device.
        calibrate: Calibration subnets (the min, the max and random ones), measured whole to fit the table's
            ``scale`` and ``offset``.
        validate: Held-out random subnets, measured whole to score the table.
        seed: Seed of the subnets.
        model: Model name recorded in the kit (default: the supernet's architecture).
        opset: ONNX opset of the graphs.
        progress: Show a progress bar (when the output is a terminal).
        precision: ``'int8'`` writes QDQ graphs (static quantization, per-channel weights) for devices that run INT8:
            the QNN HTP and NNAPI providers run only those. Their int8 weights are drawn on the device too.

    Returns:
        The kit folder.
    """
    from tqdm import tqdm
    _require_onnx()
    if precision not in PRECISIONS:
        raise ValueError(f'Unknown precision {precision!r}; allowed: {list(PRECISIONS)}')
    if precision == 'int8':
        require_quantization()
    if batch_size < 1 or calibrate < 2 or validate < 0:
        raise ValueError(f'batch_size must be >= 1, calibrate >= 2 and validate >= 0, got {batch_size}, {calibrate}, '
                         f'{validate}')
    supernet = supernet.eval()
    space = supernet.space
    model = model or supernet.pretrained_cfg.get('architecture', type(supernet).__name__)
    layout = BlockLayout.from_supernet(supernet)
    entries, sources, blocks = plan_entries(layout, LatencySettings('onnxruntime', batch_size, precision=precision))
    skeleton = LatencyTable(space, blocks, entries, {}).to_dict()
    cal = calibration_subnets(space, calibrate, seed)
    val = held_out_subnets(space, validate, seed, exclude=cal) if validate else []
    out = Path(out)
    models: List[Dict[str, Any]] = []
    with staged_folder(out) as staging:
        (staging / 'blocks').mkdir()
        (staging / 'subnets').mkdir()
        total = len(entries) + len(cal) + len(val)
        with tqdm(total=total, desc='latency kit', unit='graph', disable=None if progress else True) as bar:
            for i, module in entry_modules(supernet, layout, sources, range(len(entries))):
                rel = Path('blocks') / (entries[i]['id'].replace('@', '_') + '.onnx')
                weights = _export_graph(module, entries[i]['input'], staging / rel, opset, precision)
                models.append(dict(id=entries[i]['id'], part='blocks', file=rel.as_posix(),
                                   input=entries[i]['input'], desc=entries[i]['desc'], weights=weights))
                bar.update()
            for part, subnets in (('calibration', cal), ('validation', val)):
                for k, subnet in enumerate(subnets):
                    rel = Path('subnets') / f'{part}_{k:03d}.onnx'
                    shape = subnet_input_shape(supernet, subnet, batch_size)
                    weights = _export_graph(supernet.extract(subnet), shape, staging / rel, opset, precision)
                    models.append(dict(id=f'{part}/{k}', part=part, file=rel.as_posix(), input=shape,
                                       subnet=subnet.to_dict(), weights=weights))
                    bar.update()
        for m in models:
            m['sha256'] = _format.sha256_file(staging / m['file'])
        import timm
        manifest = dict(
            format=KIT_FORMAT, model=model, num_classes=supernet.num_classes, batch_size=batch_size, seed=seed,
            precision=precision,
            created=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            made_with=dict(torch=torch.__version__, timm=timm.__version__, onnx=_require_onnx().__version__,
                           python=platform.python_version(), opset=opset),
            table=skeleton, models=models)
        (staging / 'manifest.json').write_text(json.dumps(manifest, indent=1))
        shutil.copyfile(Path(_format.__file__), staging / 'measure.py')
        (staging / 'README.txt').write_text(_readme(model, len(entries), len(cal), len(val), precision))
    return out


def _readme(model: str, n_blocks: int, n_cal: int, n_val: int, precision: str) -> str:
    graphs = 'INT8 (QDQ) graphs' if precision == 'int8' else 'float32 graphs'
    return f"""Latency kit of {model} ({graphs}): {n_blocks} block graphs, {n_cal} calibration and {n_val} validation
subnets.

On the device (Python >= 3.8 with numpy and onnxruntime; no PyTorch):

    python measure.py                        # CPU; --provider cuda|tensorrt|coreml|nnapi|openvino|qnn|directml
    python measure.py --part validation      # later, apart in time: the held-out subnets

Run the same command again to continue an interrupted run. Then, where ofa_timm is installed:

    ofa-timm latency import results.json --out table.json
"""


def import_kit_results(results: Union[str, os.PathLike], kit: Optional[Union[str, os.PathLike]] = None
                       ) -> LatencyTable:
    """The latency table measured by a kit's ``measure.py``.

    Args:
        results: The ``results.json`` that ``measure.py`` wrote (or another runtime filled, see ``docs/search.md``).
        kit: The kit folder (default: the folder holding ``results``).

    Raises:
        ValueError: If the results are of another kit, were changed after they were written, or lack block or
            calibration measurements (the message says how to finish them).
    """
    results = Path(results)
    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'Cannot read kit results {str(results)!r}: {e}') from None
    if not isinstance(data, dict) or data.get('format') != RESULTS_FORMAT:
        raise ValueError(f'{results} is not the results of an ofa_timm latency kit (format {RESULTS_FORMAT!r})')
    if data.get('checksum') != _format.results_checksum(data):
        raise ValueError(f'{results} was changed after it was written: its checksum does not match its content (see '
                         f'docs/search.md for how a runtime other than measure.py fills and signs it)')
    kit = Path(kit) if kit is not None else results.parent
    try:
        manifest, kit_id = _format.load_kit(kit)
    except _format.KitError as e:
        raise ValueError(f'{e} (pass the kit folder as --kit)') from None
    if data.get('kit') != kit_id:
        raise ValueError(f'{results} holds results of another kit than {kit} (kit {str(data.get("kit"))[:12]} vs '
                         f'{kit_id[:12]})')
    measured = data['measurements']
    by_part: Dict[str, List[Dict[str, Any]]] = {}
    for m in manifest['models']:
        by_part.setdefault(m['part'], []).append(m)
    for part in ('blocks', 'calibration'):
        missing = [m['id'] for m in by_part.get(part, []) if 'ms' not in measured.get(m['id'], {})]
        if missing:
            raise ValueError(f'{results} lacks {len(missing)} of {len(by_part[part])} {part} measurements (e.g. '
                             f'{missing[0]}); run measure.py again with the same options to finish them')
    device = data['device']
    table_dict = dict(manifest['table'])
    entries = [dict(e, ms=measured[e['id']]['ms'], iqr=_last_iqr(measured[e['id']]),
                    passes=[p['ms'] for p in measured[e['id']]['passes']]) for e in table_dict['entries']]
    precision = manifest.get('precision', 'fp32')  # kits of 0.2.0 are float32
    meta = dict(model=manifest['model'], num_classes=manifest['num_classes'], backend='onnxruntime',
                provider=device['provider'], device=device['cpu'], platform=device['platform'],
                batch_size=manifest['batch_size'], threads=device['threads'] or 'default',
                dtype='int8 (QDQ)' if precision == 'int8' else 'float32', precision=precision,
                channels_last=False, kit=kit_id, versions=dict(onnxruntime=device['onnxruntime'],
                                                               python=device['python'], numpy=device['numpy']),
                **data['settings'])
    table = LatencyTable.from_dict(dict(table_dict, entries=entries, meta=meta, calibration=None, validation=None),
                                   where=str(results))
    cal = by_part.get('calibration', [])
    table = with_calibration(table, [Subnet.from_dict(m['subnet']) for m in cal],
                             np.array([measured[m['id']]['ms'] for m in cal]), seed=manifest['seed'])
    val = by_part.get('validation', [])
    if val and all('ms' in measured.get(m['id'], {}) for m in val):
        cal_runs = {r for m in cal for r in _runs(measured[m['id']])}
        val_runs = {r for m in val for r in _runs(measured[m['id']])}
        table.validation = dict(score_predictions(table, [Subnet.from_dict(m['subnet']) for m in val],
                                       np.array([measured[m['id']]['ms'] for m in val])),
                                apart=not (cal_runs & val_runs))
    return table


def _runs(entry: Dict[str, Any]) -> List[int]:
    return [p.get('run', 0) for p in entry.get('passes', [])]


def _last_iqr(entry: Dict[str, Any]) -> Optional[float]:
    passes = entry.get('passes') or [{}]
    best = min(passes, key=lambda p: p.get('ms', float('inf')))
    return best.get('iqr')
