"""Latency tables measured on the user's own device: time every distinct block once, predict any subnet by a lookup.

``build_latency_table`` times every distinct block configuration a space can produce (the block's computation, given
by ``BlockSpec.key``, at each input size its resolutions give), with warm-up, repeats and medians, on PyTorch (CPU
or CUDA, optionally bf16 autocast and channels-last) or ONNX Runtime. The table is written as it is built, so an
interrupted build resumes where it stopped, and it records what it was measured on.

A block timed alone runs warmer than inside a network (its weights and code stay in cache between repeats), so the
plain sum of block latencies underestimates a whole network. The table therefore measures a few calibration subnets
end to end and fits ``latency = scale * sum + offset`` on them; :func:`validate_latency_table` then measures other,
held-out subnets and reports the error of the prediction.

    table = build_latency_table(supernet, 'cpu_b1.json', LatencySettings('torch-cpu', batch_size=1, threads=2))
    table(space.encode(population))        # predicted ms of each subnet (numpy, vectorised)
    validate_latency_table(table, supernet, n=30)
"""
import contextlib
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._io import write_text_atomic
from .._malloc import steady_allocator
from ..space import SearchSpace, Subnet, SubnetLike, read_json
from .cost import AdditiveCost, BlockLayout, disjoint_groups
from .quantize import PRECISIONS, cpu_session, onnx_bytes, quantize_for_timing

__all__ = ['BACKENDS', 'LatencySettings', 'LatencyTable', 'build_latency_table', 'validate_latency_table',
           'measure_subnets', 'measure_anchored', 'AnchoredLatency', 'plan_entries', 'entry_modules',
           'score_predictions', 'calibration_subnets', 'held_out_subnets', 'with_calibration', 'subnet_input_shape']

BACKENDS = ('torch-cpu', 'torch-cuda', 'onnxruntime')
TABLE_FORMAT = 'ofa_timm.latency_table.v1'
_SAVE_EVERY_S = 2.0


@dataclass(frozen=True)
class LatencySettings:
    """What a latency is measured on, and how.

    Args:
        backend: ``'torch-cpu'``, ``'torch-cuda'`` or ``'onnxruntime'`` (CPU execution provider).
        batch_size: Images per forward pass.
        threads: Intra-op threads (default: PyTorch's current number).
        amp: ``'bf16'`` runs under bf16 autocast (PyTorch backends); None runs float32.
        channels_last: Run PyTorch in channels-last memory format.
        warmup: Untimed calls before timing.
        repeats: Timed samples; the latency is their median.
        min_sample_ms: A sample repeats the call until it lasts this long (fast blocks are timed over many calls).
        passes: Passes over everything measured, apart in time; each entry keeps its smallest median. A slow spell of
            a shared machine (another job, a throttled core) only ever adds time, and it lasts seconds to minutes:
            measured here, a whole subnet ran 35 % slower for a minute, then as before.
        precision: ``'fp32'`` or ``'int8'``: the QDQ graph ``onnxruntime`` runs after static quantization (the
            onnxruntime backend only; activation ranges come from random inputs, which leave integer kernels' speed
            alone).
    """
    backend: str = 'torch-cpu'
    batch_size: int = 1
    threads: Optional[int] = None
    amp: Optional[str] = None
    channels_last: bool = False
    warmup: int = 10
    repeats: int = 30
    min_sample_ms: float = 1.0
    passes: int = 2
    precision: str = 'fp32'

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f'Unknown latency backend {self.backend!r}; allowed: {list(BACKENDS)}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'Unknown precision {self.precision!r}; allowed: {list(PRECISIONS)}')
        if self.precision == 'int8' and self.backend != 'onnxruntime':
            raise ValueError(f'INT8 latency is measured on the QDQ graph onnxruntime runs: use the onnxruntime backend '
                             f'(or a latency kit on the device), not {self.backend}')
        if self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError(f'batch_size and threads must be >= 1, got {self.batch_size}, {self.threads}')
        if self.amp not in (None, 'bf16'):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        if self.backend == 'onnxruntime' and (self.amp or self.channels_last):
            raise ValueError('The onnxruntime backend runs the float32 ONNX graph: --amp and --channels-last apply to '
                             'the torch-cpu and torch-cuda backends only')
        if self.warmup < 0 or self.repeats < 1 or self.passes < 1:
            raise ValueError(f'warmup must be >= 0, repeats and passes >= 1, got {self.warmup}, {self.repeats}, '
                             f'{self.passes}')

    @property
    def dtype(self) -> str:
        if self.precision == 'int8':
            return 'int8 (QDQ)'
        return 'bfloat16 (autocast)' if self.amp == 'bf16' else 'float32'


# --- timing --------------------------------------------------------------------------------------------------------
class _Runner:
    """Runs modules in sequence on a fixed input with one backend, and times them."""

    def __init__(self, module: nn.Module, input_shape: Tuple[int, ...], settings: LatencySettings):
        self.settings = settings
        backend = settings.backend
        module = module.eval()
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
        self.cuda = backend == 'torch-cuda'
        if backend == 'onnxruntime':
            self._call = _onnx_session(module, x, settings.threads, settings.precision)
            return
        device = torch.device('cuda' if self.cuda else 'cpu')
        memory_format = torch.channels_last if settings.channels_last and x.dim() == 4 else torch.contiguous_format
        module = module.to(device=device, memory_format=memory_format)
        x = x.to(device=device).contiguous(memory_format=memory_format)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if settings.amp == 'bf16' \
            else contextlib.nullcontext

        def call() -> None:
            with torch.inference_mode(), autocast():
                module(x)
        self._call = call

    def sample(self, number: int) -> float:
        """Milliseconds per call, over ``number`` back-to-back calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                self._call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / number
        t0 = time.perf_counter_ns()
        for _ in range(number):
            self._call()
        return (time.perf_counter_ns() - t0) / 1e6 / number

    def warm_up(self) -> int:
        """Run the warm-up calls; returns the calls per sample that make a sample last ``min_sample_ms``."""
        for _ in range(self.settings.warmup):
            self._call()
        if self.cuda:
            torch.cuda.synchronize()
        once = self.sample(1)
        return max(1, int(math.ceil(self.settings.min_sample_ms / max(once, 1e-6))))


def _onnx_session(module: nn.Module, x: torch.Tensor, threads: Optional[int],
                  precision: str = 'fp32') -> Callable[[], None]:
    _import_onnxruntime()  # a clear error where it is missing
    graph = onnx_bytes(module, x)
    if precision == 'int8':
        graph = quantize_for_timing(graph, x.shape)
    session = cpu_session(graph, threads or torch.get_num_threads(), timing=True)
    feed = {'input': x.numpy()}
    return lambda: session.run(None, feed)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ValueError('The onnxruntime backend needs onnxruntime: pip install "ofa-timm[onnx]"') from None
    return onnxruntime


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def _check_backend(settings: LatencySettings) -> None:
    """Raise a ValueError if the backend cannot run on this machine."""
    if settings.backend == 'torch-cuda' and not torch.cuda.is_available():
        raise ValueError('The torch-cuda backend needs a CUDA device, and torch.cuda.is_available() is False here; '
                         'use --backend torch-cpu or onnxruntime')
    if settings.backend == 'onnxruntime':
        _import_onnxruntime()


@contextlib.contextmanager
def _backend_context(settings: LatencySettings) -> Iterator[None]:
    """Check that the backend can run here; set PyTorch's threads and a steady allocator for the duration."""
    _check_backend(settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or threads)
    try:
        with steady_allocator():  # a block timed alone and inside a network see the same allocator
            yield
    finally:
        torch.set_num_threads(threads)


def _median_ms(runner: _Runner, settings: LatencySettings) -> Tuple[float, float]:
    number = runner.warm_up()
    samples = np.array([runner.sample(number) for _ in range(settings.repeats)])
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return float(med), float(q3 - q1)


def subnet_input_shape(supernet: nn.Module, subnet: Subnet, batch_size: int) -> List[int]:
    """``[batch, channels, r, r]`` of a subnet's input (r: its resolution, else the model's input size)."""
    res = supernet.resolution_of(subnet)
    return [batch_size, int(getattr(supernet, 'in_chans', 3)), res, res]


class _Rounds:
    """Extracted subnets, warmed up once, timed in interleaved rounds: every round takes the same few samples of each
    subnet in turn, so that a slow spell of a shared machine touches all of them alike instead of spoiling one."""

    def __init__(self, supernet: nn.Module, subnets: Sequence[Subnet], settings: LatencySettings, bar: Any):
        self.settings = settings
        self.bar = bar
        self.runners, self.numbers = [], []
        for s in subnets:
            runner = _Runner(supernet.extract(s).eval(), subnet_input_shape(supernet, s, settings.batch_size),
                             settings)
            self.runners.append(runner)
            self.numbers.append(runner.warm_up())
            bar.update()

    def round(self, samples: int) -> np.ndarray:
        """The median (ms) of ``samples`` samples of each subnet, taken in turn."""
        out = np.empty(len(self.runners))
        for i, (runner, number) in enumerate(zip(self.runners, self.numbers)):
            out[i] = np.median([runner.sample(number) for _ in range(samples)])
            self.bar.update()
        return out


def measure_subnets(
        supernet: nn.Module, subnets: Sequence[SubnetLike], settings: LatencySettings, rounds: int = 5,
        progress: bool = False, desc: str = 'end to end',
) -> np.ndarray:
    """End-to-end latency (ms, median) of each extracted subnet, measured in interleaved rounds.

    Every round takes ``settings.repeats / rounds`` samples of each subnet in turn, so a slow spell of a shared
    machine touches all subnets alike instead of spoiling one; the rounds are run ``settings.passes`` times and each
    subnet keeps its smallest median (slow spells only add time).
    """
    from tqdm import tqdm
    subnets = [supernet.resolve(s) for s in subnets]
    per_round = max(1, settings.repeats // rounds)
    medians = np.full((settings.passes, len(subnets)), np.inf)
    # disable=None: no bar when the output is not a terminal (a log file would fill with carriage returns)
    bar = tqdm(total=len(subnets) * (rounds * settings.passes + 1), desc=desc, disable=None if progress else True)
    with _backend_context(settings), bar:
        timer = _Rounds(supernet, subnets, settings, bar)
        for p in range(settings.passes):
            medians[p] = np.median([timer.round(per_round) for _ in range(rounds)], axis=0)
    return medians.min(axis=0)


@dataclass
class AnchoredLatency:
    """Subnets timed now, and translated to the machine's speed when the table was built.

    The table's first calibration subnets (*anchors*, with their time at the build) are timed in every round with
    the measured subnets; each round's *drift* is the anchors' median ratio of now to then, and a subnet's time in the
    table's terms is its time in that round divided by that round's drift. A slow spell slows anchors and subnets
    alike, so it cancels out of the ratio; rounds are added until the 95 % interval of every estimate is narrow.

    Attributes:
        measured_ms: Median time now (ms), as a clock here reads it.
        table_ms: Median of the drift-corrected times (ms): what the table should predict.
        low_ms: Lower end of the 95 % bootstrap interval of ``table_ms``.
        high_ms: Upper end of it.
        drift: Median over rounds of the anchors' now-to-build ratio (1.2: the machine runs 20 % slower than then).
        rounds: Rounds measured.
    """
    measured_ms: np.ndarray
    table_ms: np.ndarray
    low_ms: np.ndarray
    high_ms: np.ndarray
    drift: float
    rounds: int


def _bootstrap_median(values: np.ndarray, rng: np.random.Generator, draws: int = 500) -> Tuple[np.ndarray, ...]:
    """Median over axis 0 of ``values`` (rounds, n) and its 95 % percentile bootstrap interval over rounds."""
    picks = rng.integers(0, len(values), size=(draws, len(values)))
    medians = np.median(values[picks], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5], axis=0)
    return np.median(values, axis=0), low, high


def measure_anchored(
        table: 'LatencyTable', supernet: nn.Module, subnets: Sequence[SubnetLike], anchors: int = 4,
        min_rounds: int = 8, max_rounds: int = 40, target_pct: float = 2.0, progress: bool = False,
        desc: str = 'end to end (anchored)',
) -> AnchoredLatency:
    """Time ``subnets`` at the table's settings, normalised by the table's anchor subnets (see
    :class:`AnchoredLatency`); rounds are added, ``min_rounds`` at a time, until every 95 % interval is within
    ±``target_pct`` % of its estimate, or ``max_rounds`` are done.

    Raises:
        ValueError: If the table is of another space, or was measured on another device (a kit).
    """
    from tqdm import tqdm
    if table.space != supernet.space:
        raise ValueError("The latency table was built for another space than the supernet's")
    if table.meta.get('kit'):
        raise ValueError('This table was measured on another device through a latency kit: measure subnets there')
    cal = table.calibration or {}
    # a table without calibration subnets has nothing to anchor on: its rounds are taken as they come (drift 1)
    anchor = [Subnet.from_dict(d) for d in cal.get('subnets', [])][:anchors]
    then = np.asarray(cal.get('measured_ms', [])[:len(anchor)], dtype=np.float64)
    subnets = [supernet.resolve(s) for s in subnets]
    settings = table.settings
    per_round = max(1, settings.repeats // 5)
    everything = subnets + anchor
    bar = tqdm(total=len(everything) * (max_rounds + 1), desc=desc, disable=None if progress else True)
    rng = np.random.default_rng(0)
    rows: List[np.ndarray] = []
    with _backend_context(settings), bar:
        timer = _Rounds(supernet, everything, settings, bar)
        while len(rows) < max_rounds:
            rows.extend(timer.round(per_round) for _ in range(min(min_rounds, max_rounds - len(rows))))
            times = np.asarray(rows)
            drift = np.median(times[:, len(subnets):] / then, axis=1) if anchor else np.ones(len(times))
            table_ms, low, high = _bootstrap_median(times[:, :len(subnets)] / drift[:, None], rng)
            if len(subnets) == 0 or np.all((high - low) / 2 <= table_ms * target_pct / 100):
                break
    return AnchoredLatency(np.median(times[:, :len(subnets)], axis=0), table_ms, low, high,
                           float(np.median(drift)), len(rows))


# --- the table -----------------------------------------------------------------------------------------------------
def _versions(settings: LatencySettings) -> Dict[str, str]:
    import timm
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version('ofa-timm')
    except PackageNotFoundError:
        ours = 'unknown'
    versions = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                    ofa_timm=ours, numpy=np.__version__)
    if settings.backend == 'onnxruntime':
        versions['onnxruntime'] = _import_onnxruntime().__version__
    return versions


def _device_name(settings: LatencySettings) -> str:
    if settings.backend == 'torch-cuda':
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def _entry_id(spec: Any, size: int) -> str:
    return hashlib.sha1(repr(spec.key).encode()).hexdigest()[:16] + f'@{size}'


def _entry_desc(spec: Any, size: int) -> str:
    extra = ' se' if spec.se else ''
    return (f'{spec.name} {spec.kind} {spec.in_chs}->{spec.out_chs} mid {spec.mid_chs} k{spec.kernel} '
            f's{spec.stride}{extra} {spec.act} @{size}px')


class LatencyTable(AdditiveCost):
    """Measured block latencies of a space, and the vectorised prediction of any subnet's latency from them.

    Build one with :func:`build_latency_table`, read one with :meth:`load`. As a cost model it plugs into
    :func:`~ofa_timm.search.specialize` as a constraint.

    Args:
        space: The search space.
        blocks: ``(name, genes, entry index array (combinations, resolutions), -1 where absent)`` per block.
        entries: One dict per distinct block computation: ``id``, ``desc``, ``input`` (shape), ``ms``, ``iqr``.
        meta: What the table was measured on (backend, device, threads, batch, dtype, versions, model, ...).
        calibration: ``scale``, ``offset`` and the calibration subnets' measurements, or None.
        validation: The last validation's summary, or None.
    """

    def __init__(
            self,
            space: SearchSpace,
            blocks: Sequence[Tuple[str, Tuple[int, ...], np.ndarray]],
            entries: Sequence[Dict[str, Any]],
            meta: Dict[str, Any],
            calibration: Optional[Dict[str, Any]] = None,
            validation: Optional[Dict[str, Any]] = None,
    ):
        self.block_names = [b[0] for b in blocks]
        self.entry_index = [np.asarray(b[2], dtype=np.int64) for b in blocks]
        self.entries = list(entries)
        self.meta = dict(meta)
        self.calibration = calibration
        self.validation = validation
        ms = np.array([e['ms'] if e.get('ms') is not None else np.nan for e in self.entries] + [0.0])
        tables = [ms[np.where(idx >= 0, idx, len(self.entries))] for idx in self.entry_index]
        cal = calibration or {}
        super().__init__(space, [b[1] for b in blocks], tables, name='latency', unit='ms',
                         scale=cal.get('scale', 1.0), offset=cal.get('offset', 0.0))

    @property
    def complete(self) -> bool:
        """Whether every entry has been measured."""
        return all(e.get('ms') is not None for e in self.entries)

    @property
    def missing(self) -> int:
        return sum(e.get('ms') is None for e in self.entries)

    def __call__(self, subnets: Any) -> np.ndarray:
        if not self.complete:
            raise ValueError(f'The latency table is incomplete ({self.missing} of {len(self.entries)} block entries '
                             f'not measured); finish it with build_latency_table (ofa-timm latency) first')
        return super().__call__(subnets)

    predict = __call__

    def minimum(self) -> Tuple[float, Subnet]:
        self(np.zeros((0, len(self.space.genes)), dtype=np.int64))  # raises if incomplete
        return super().minimum()

    # --- files --------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dict(
            format=TABLE_FORMAT, meta=self.meta, space=self.space.to_dict(),
            blocks=[dict(name=n, genes=list(g), entries=idx.tolist())
                    for n, g, idx in zip(self.block_names, self.genes, self.entry_index)],
            entries=self.entries, calibration=self.calibration, validation=self.validation)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the table as JSON, atomically."""
        return write_text_atomic(path, json.dumps(self.to_dict(), separators=(',', ':')) + '\n')

    @classmethod
    def from_dict(cls, d: Dict[str, Any], space: Optional[SearchSpace] = None, where: str = 'table') -> 'LatencyTable':
        if not isinstance(d, dict) or d.get('format') != TABLE_FORMAT:
            raise ValueError(f'{where} is not an ofa_timm latency table (format {TABLE_FORMAT!r})')
        own = SearchSpace.from_dict(d['space'])
        if space is not None and own != space:
            raise ValueError(f'{where} was built for another space than this one (model {d["meta"].get("model")!r}, '
                             f'resolutions {list(own.resolutions)[:4]}...); build a table for this space with '
                             f'ofa-timm latency')
        blocks = [(b['name'], tuple(b['genes']), np.array(b['entries'], dtype=np.int64).reshape(
            -1, max(1, len(own.resolutions)))) for b in d['blocks']]
        return cls(own, blocks, d['entries'], d['meta'], d.get('calibration'), d.get('validation'))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], space: Optional[SearchSpace] = None) -> 'LatencyTable':
        """Read a table written by :func:`build_latency_table`.

        Raises:
            ValueError: If the file is not a latency table, or ``space`` is given and differs from the table's.
        """
        return cls.from_dict(read_json(path), space, where=os.fspath(path))

    @property
    def precision(self) -> str:
        """``'fp32'`` or ``'int8'``: what the table's graphs computed in (tables of 0.2.0: fp32)."""
        return self.meta.get('precision', 'fp32')

    @property
    def settings(self) -> LatencySettings:
        """The settings the table was measured with (what a later measurement of a subnet must use)."""
        m = self.meta
        return LatencySettings(m['backend'], m['batch_size'], m['threads'],
                               'bf16' if 'bfloat16' in m['dtype'] else None, m['channels_last'], m['warmup'],
                               m['repeats'], m['min_sample_ms'], m.get('passes', 1), self.precision)

    def check_precision(self, precision: str, where: str = 'the table') -> 'LatencyTable':
        """The table itself, if it was measured in ``precision``.

        Raises:
            ValueError: Naming both precisions and how to measure a table of the wanted one.
        """
        if self.precision != precision:
            raise ValueError(
                f'{where} was measured in {self.precision}, and this run deploys {precision}: a latency of one '
                f'precision says nothing of the other. Measure a {precision} table (ofa-timm latency build --backend '
                f'onnxruntime --precision {precision}, or a kit made with --precision {precision})')
        return self

    def describe(self) -> str:
        """One line on what the table was measured on."""
        m = self.meta
        return (f"{m.get('model')} on {m.get('device')} ({m.get('backend')}, batch {m.get('batch_size')}, "
                f"{m.get('threads')} threads, {m.get('dtype')}{', channels-last' if m.get('channels_last') else ''})")


def _table_meta(supernet: nn.Module, settings: LatencySettings, model: str) -> Dict[str, Any]:
    return dict(
        model=model or supernet.pretrained_cfg.get('architecture', type(supernet).__name__),
        num_classes=supernet.num_classes, backend=settings.backend, device=_device_name(settings),
        batch_size=settings.batch_size, threads=settings.threads or torch.get_num_threads(), dtype=settings.dtype,
        precision=settings.precision,
        channels_last=settings.channels_last, warmup=settings.warmup, repeats=settings.repeats,
        min_sample_ms=settings.min_sample_ms, passes=settings.passes, versions=_versions(settings))


# Meta fields a resumed build must share with the file it continues.
_RESUME_KEYS = ('model', 'num_classes', 'backend', 'device', 'batch_size', 'threads', 'dtype', 'channels_last',
                'versions')


def plan_entries(layout: BlockLayout, settings: LatencySettings):
    """Entries (distinct block computations per input size), the (block, combination, resolution index) that first
    produces each, and every block's entry index table (-1 where the block is absent)."""
    positions: Dict[str, int] = {}
    entries: List[Dict[str, Any]] = []
    sources: List[Tuple[int, int, int]] = []
    blocks = []
    for b, block in enumerate(layout.blocks):
        index = np.full((len(block.specs), len(layout.resolutions)), -1, dtype=np.int64)
        for c, spec in enumerate(block.specs):
            if spec is None:
                continue
            for r, res in enumerate(layout.resolutions):
                size = spec.input_size(res)
                eid = _entry_id(spec, size)
                if eid not in positions:
                    positions[eid] = len(entries)
                    entries.append(dict(id=eid, desc=_entry_desc(spec, size),
                                        input=spec.input_shape(res, settings.batch_size), ms=None, iqr=None,
                                        passes=[]))
                    sources.append((b, c, r))
                index[c, r] = positions[eid]
        blocks.append((block.name, block.genes, index))
    return entries, sources, blocks


def entry_modules(supernet: nn.Module, layout: BlockLayout, sources: Sequence[Tuple[int, int, int]],
                  indices: Sequence[int]) -> Iterator[Tuple[int, nn.Module]]:
    """The module that computes each entry in ``indices``: ``(index, module)``, what the supernet's
    ``latency_module`` gives for the entry's block of an extracted model (its modules run in sequence).

    One extracted model serves every entry of a group of blocks whose genes do not overlap (see ``BlockLayout``), so
    a MobileNetV3 space needs about a hundred extractions rather than one per entry. A block whose module is built
    for one input size (``BlockSpec.fixed_resolution``: a position embedding) comes from a model extracted at the
    entry's resolution.

    Args:
        supernet: The supernet.
        layout: Its ``BlockLayout``.
        sources: The (block, gene combination, resolution index) that first produces each entry (the table's plan).
        indices: The entries wanted.
    """
    space = layout.space
    names = [b.name for b in layout.blocks]
    group_of = {name: g for g, group in enumerate(disjoint_groups(names, {b.name: b.genes for b in layout.blocks}))
                for name in group}
    by_model: Dict[Tuple[int, int, int], List[int]] = {}
    for i in indices:
        b, c, r = sources[i]
        fixed = layout.blocks[b].specs[c].fixed_resolution
        by_model.setdefault((group_of[names[b]], c, r if fixed else -1), []).append(i)
    base = space.encode(space.max())
    for (group, row, r), items in sorted(by_model.items()):
        codes = base.copy()
        for block in layout.blocks:
            if group_of[block.name] == group and block.genes:
                codes[list(block.genes)] = np.unravel_index(row % len(block.specs),
                                                            [int(space.choice_counts[g]) for g in block.genes])
        subnet = space.decode(codes)
        if r >= 0:
            subnet = subnet.replace(resolution=layout.resolutions[r])
        extracted = supernet.extract(subnet).eval()
        for i in items:
            b, c, _ = sources[i]
            yield i, supernet.latency_module(extracted, layout.blocks[b].specs[c])


def build_latency_table(
        supernet: nn.Module,
        path: Union[str, os.PathLike],
        settings: LatencySettings = LatencySettings(),
        calibrate: int = 10,
        seed: int = 0,
        model: str = '',
        progress: bool = True,
        validate: int = 0,
) -> LatencyTable:
    """Measure (or finish measuring) the latency table of ``supernet``'s space on this machine.

    Args:
        supernet: The supernet; only its architecture matters (weights do not change a float32 latency).
        path: The JSON file. It is rewritten every few seconds while the table is built; if it exists, the build
            resumes from it.
        settings: Backend, batch size, threads, dtype and timing.
        calibrate: Number of calibration subnets (the min, the max and random ones) measured end to end to fit the
            table's ``scale`` and ``offset``; 0 keeps the plain sum.
        seed: Seed of the calibration subnets.
        model: Model name recorded in the table (default: the supernet's architecture).
        progress: Show progress bars (when the output is a terminal).
        validate: Also measure this many held-out random subnets, in the same interleaved rounds as the calibration
            subnets (so both see the machine in the same state), and store the error of the prediction in
            ``table.validation``.

    Raises:
        ValueError: If ``path`` holds a table of another space or other settings, the backend cannot run here, or
            ``path`` cannot be written.
    """
    from tqdm import tqdm
    _check_backend(settings)
    space = supernet.space
    layout = BlockLayout.from_supernet(supernet)
    meta = _table_meta(supernet, settings, model)
    entries, sources, blocks = plan_entries(layout, settings)
    calibration = None
    path = Path(path)
    if path.exists():
        old = LatencyTable.load(path)
        if old.space != space:
            raise ValueError(f'{path} holds a latency table of another space (model {old.meta.get("model")!r}); '
                             f'pass another --out')
        differ = [k for k in _RESUME_KEYS if old.meta.get(k) != meta.get(k)]
        if differ:
            settings_text = ', '.join(f'{k}: {old.meta.get(k)!r}' for k in differ)
            raise ValueError(f'{path} was measured with other settings ({settings_text}); pass another --out or the '
                             f'same settings to resume it')
        measured = {e['id']: e for e in old.entries if e.get('ms') is not None}
        for e in entries:
            if e['id'] in measured:
                m = measured[e['id']]
                e.update(ms=m['ms'], iqr=m.get('iqr'), passes=m.get('passes') or [m['ms']])
        calibration = old.calibration
    table = LatencyTable(space, blocks, entries, meta, calibration)
    table.save(path)  # fails early on an unwritable path
    last_save = time.monotonic()
    left = sum(max(0, settings.passes - len(e['passes'])) for e in entries)
    try:
        with _backend_context(settings), tqdm(total=left, desc='latency table', unit='entry',
                                               disable=None if progress else True) as bar:
            for p in range(settings.passes):  # each pass after the last: a slow spell spoils one pass at most
                todo = [i for i, e in enumerate(entries) if len(e['passes']) <= p]
                for i, module in entry_modules(supernet, layout, sources, todo):
                    median, iqr = _median_ms(_Runner(module, tuple(entries[i]['input']), settings), settings)
                    e = entries[i]
                    e['passes'].append(median)
                    if e['ms'] is None or median < e['ms']:
                        e['ms'], e['iqr'] = median, iqr
                    bar.set_postfix_str(f'pass {p + 1}: {e["desc"][:36]}')
                    bar.update()
                    if time.monotonic() - last_save > _SAVE_EVERY_S:
                        LatencyTable(space, blocks, entries, meta, calibration).save(path)
                        last_save = time.monotonic()
    finally:
        table = LatencyTable(space, blocks, entries, meta, calibration)
        table.save(path)
    if calibrate and (table.calibration is None or validate):
        table = calibrate_latency_table(table, supernet, calibrate, seed, progress, validate=validate)
        table.save(path)
    elif validate:
        validate_latency_table(table, supernet, validate, seed, progress)
        table.save(path)
    return table


def _subnets(space: SearchSpace, n: int, seed: int, exclude: Sequence[Subnet] = ()) -> List[Subnet]:
    rng = np.random.default_rng(seed)
    out: Dict[Subnet, None] = {}
    skip = set(exclude)
    for _ in range(100 * n + 100):
        if len(out) >= n:
            break
        s = space.sample(rng)
        if s not in skip:
            out.setdefault(s)
    return list(out)


def calibration_subnets(space: SearchSpace, n: int = 10, seed: int = 0) -> List[Subnet]:
    """The subnets a table's calibration is fitted on: the min, the max, and random ones (``n`` in all)."""
    return list(dict.fromkeys([space.min(), space.max()] + _subnets(space, max(0, n - 2), seed)))[:max(n, 1)]


def held_out_subnets(space: SearchSpace, n: int, seed: int, exclude: Sequence[Subnet] = ()) -> List[Subnet]:
    """``n`` random subnets drawn apart from ``exclude`` (the calibration subnets), to score a table on."""
    return _subnets(space, n, seed + 1_000_003, exclude=exclude)


def with_calibration(table: LatencyTable, subnets: Sequence[Subnet], measured: np.ndarray,
                     seed: int = 0) -> LatencyTable:
    """``table`` with ``latency = scale * sum + offset`` fitted on the end-to-end ``measured`` times of ``subnets``.

    The fit is Theil-Sen (median of pairwise slopes, then median offset), so one subnet measured during a slow spell
    of the machine does not tilt it.
    """
    measured = np.asarray(measured, dtype=np.float64)
    raw = table.raw(table.space.encode(list(subnets))).astype(np.float64)
    scale, offset = _theil_sen(raw, measured)
    calibration = dict(scale=scale, offset=offset, subnets=[s.to_dict() for s in subnets],
                       measured_ms=measured.round(4).tolist(), sum_ms=raw.round(4).tolist(), seed=seed)
    blocks = list(zip(table.block_names, table.genes, table.entry_index))
    return LatencyTable(table.space, blocks, table.entries, table.meta, calibration, table.validation)


def calibrate_latency_table(table: LatencyTable, supernet: nn.Module, n: int = 10, seed: int = 0,
                            progress: bool = True, rounds: int = 5, validate: int = 0) -> LatencyTable:
    """Fit ``latency = scale * sum + offset`` on ``n`` subnets measured end to end (see :func:`with_calibration`).

    With ``validate``, that many other random subnets are measured in the same interleaved rounds and scored against
    the fitted prediction (``table.validation``); they never enter the fit.
    """
    space = table.space
    subnets = calibration_subnets(space, n, seed)
    held_out = held_out_subnets(space, validate, seed, exclude=subnets) if validate else []
    measured = measure_subnets(supernet, subnets + held_out, table.settings, rounds, progress,
                               desc='calibration' + (' + validation' if validate else ''))
    table = with_calibration(table, subnets, measured[:len(subnets)], seed)
    if validate:
        table.validation = dict(score_predictions(table, held_out, measured[len(subnets):]), apart=False)
    return table


def _theil_sen(x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    """Robust line fit ``y ~ scale * x + offset``; a ratio when the points cannot define a positive slope."""
    i, j = np.triu_indices(len(x), 1)
    keep = x[j] != x[i]
    slopes = (y[j] - y[i])[keep] / (x[j] - x[i])[keep]
    scale = float(np.median(slopes)) if len(slopes) else 0.0
    if not scale > 0:
        return float(np.median(y / x)), 0.0
    return scale, float(np.median(y - scale * x))


def score_predictions(table: 'LatencyTable', subnets: Sequence[Subnet], measured: np.ndarray) -> Dict[str, Any]:
    """Errors of the table's prediction (and of the plain sum) against end-to-end measurements."""
    codes = table.space.encode(subnets)
    predicted, plain = table(codes), table.raw(codes)
    err = 100 * (predicted - measured) / measured
    plain_err = 100 * (plain - measured) / measured
    return dict(
        n=len(subnets), median_abs_pct=float(np.median(np.abs(err))), max_abs_pct=float(np.max(np.abs(err))),
        within_10_pct=float(100 * np.mean(np.abs(err) <= 10)),
        plain_median_abs_pct=float(np.median(np.abs(plain_err))), plain_max_abs_pct=float(np.max(np.abs(plain_err))),
        rows=[dict(subnet=s.to_dict(), measured_ms=round(float(m), 4), predicted_ms=round(float(p), 4),
                   error_pct=round(float(e), 2)) for s, m, p, e in zip(subnets, measured, predicted, err)])


def validation_summary(result: Dict[str, Any]) -> str:
    """One line on a validation: how many subnets, when they were measured, the errors, and the drift."""
    when = ('measured in a later, separate run' if result.get('apart') else
            'measured in the same rounds as the calibration')
    text = (f"{result['n']} held-out subnets ({when}): median |error| {result['median_abs_pct']:.2f}%, "
            f"{result.get('within_10_pct', float('nan')):.0f}% within ±10%, max {result['max_abs_pct']:.2f}% (plain "
            f"sum of blocks: median {result['plain_median_abs_pct']:.2f}%, max {result['plain_max_abs_pct']:.2f}%)")
    if 'drift' in result:
        r = result['rescaled']
        rounds = f" over {result['rounds']} rounds" if 'rounds' in result else ''
        interval = f", 95% intervals ±{result['interval_pct']:.1f}%" if 'interval_pct' in result else ''
        text += (f"; drift since the build: the calibration subnets now take {result['drift']:.3f}x their time then; "
                 f"corrected for it round by round{rounds}, median {r['median_abs_pct']:.2f}%, "
                 f"{r['within_10_pct']:.0f}% within ±10%, max {r['max_abs_pct']:.2f}%{interval}")
    return text


def validate_latency_table(
        table: LatencyTable, supernet: nn.Module, n: int = 20, seed: int = 1, progress: bool = True,
        rounds: int = 5, anchors: int = 4, max_rounds: int = 40,
) -> Dict[str, Any]:
    """Measure ``n`` held-out random subnets end to end, now, and compare with the table's prediction.

    Run it apart from the build (another process, another time): that error is what a user of the table meets. The
    first ``anchors`` calibration subnets are timed again in every round (:func:`measure_anchored`): their ratio of
    now to the build is the *drift* (how much this machine's speed moved since the table was built), and the error is
    also given with each round's times divided by that round's drift, which is the table's own error once the
    machine's swings are taken out. Rounds are added ``rounds`` at a time until the estimates are stable.

    Returns ``{'n', 'median_abs_pct', 'max_abs_pct', 'within_10_pct' (the share of subnets predicted within ±10 %),
    'plain_median_abs_pct', 'plain_max_abs_pct' (the uncalibrated sum), 'apart': True, 'drift', 'rescaled'
    (the same scores on the drift-corrected times), 'rounds', 'interval_pct' (median half-width of the 95 %
    intervals), 'rows'}``, and stores it in ``table.validation``.

    Raises:
        ValueError: If the table is of another space, or was measured on another device through a kit (validate
            it there: ``python measure.py --part validation``).
    """
    if table.space != supernet.space:
        raise ValueError('The latency table was built for another space than the supernet\'s')
    if table.meta.get('kit'):
        raise ValueError('This table was measured on another device through a latency kit: measure its validation '
                         'subnets there (python measure.py --part validation) and import the results again')
    cal = table.calibration or {}
    calibration = [Subnet.from_dict(d) for d in cal.get('subnets', [])]
    subnets = held_out_subnets(table.space, n, seed, exclude=calibration)
    if not calibration or anchors < 1:
        measured = measure_subnets(supernet, subnets, table.settings, rounds, progress, desc='validation')
        result = dict(score_predictions(table, subnets, measured), apart=True)
    else:
        m = measure_anchored(table, supernet, subnets, anchors, min_rounds=max(rounds, 2), max_rounds=max_rounds,
                             progress=progress, desc='validation (anchored)')
        result = dict(score_predictions(table, subnets, m.measured_ms), apart=True)
        rescaled = score_predictions(table, subnets, m.table_ms)
        result.update(drift=m.drift, anchors=min(anchors, len(calibration)), rounds=m.rounds,
                      interval_pct=float(np.median(100 * (m.high_ms - m.low_ms) / 2 / m.table_ms)),
                      rescaled={k: rescaled[k] for k in ('median_abs_pct', 'max_abs_pct', 'within_10_pct')})
    table.validation = result
    return result
