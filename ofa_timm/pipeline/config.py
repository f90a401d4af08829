"""What a run of the pipeline is given and what it gives back: ``RunConfig``, ``BudgetResult``, ``PipelineResult``, the
demo's configuration, and the signal that stops a run."""
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..search.budget import Budget, parse_budgets
from ..search.quantize import PRECISIONS, QuantizeConfig
from ..space import Subnet
from ..training import TrainConfig
from ..training.data import IMAGENET_SCALE

__all__ = ['STEPS', 'LOCAL_BACKENDS', 'DEFAULT_SUBNETS', 'RunConfig', 'BudgetResult', 'PipelineResult',
           'PipelineInterrupted', 'demo_config']

STEPS: Tuple[str, ...] = ('train', 'latency', 'accuracy', 'predictor', 'search', 'finalists', 'export', 'report')
LOCAL_BACKENDS = ('torch-cpu', 'torch-cuda', 'onnxruntime')
# Subnets the accuracy dataset evaluates by default: on the digits supernet the predictor's held-out Spearman is 0.68
# at 25, 0.83 at 50, 0.90 at 100 and 0.92 at 200 (docs/search.md, "How many subnets to evaluate"); the finalists step
# measures the best candidates anyway, so twice the evaluations for +0.02 is left to --subnets.
DEFAULT_SUBNETS = 100


@dataclass
class RunConfig:
    """What ``run`` does.

    Args:
        model: A registered ``ofa_*`` name.
        model_kwargs: Arguments of the source model or the space (``depth=6, img_size=32, patch_size=4``).
        data_dir: Dataset root: an ImageFolder with ``train`` and ``validation`` folders, or a timm dataset root with
            ``dataset``.
        budgets: One per exported subnet (``'5ms,10ms,20ms'``, ``'300MFLOPs'``, ``'10ms+300MFLOPs'``,
            ``'25%latency'``; see ``ofa_timm.search.parse_budgets``).
        out: The work folder.
        latency: ``'torch-cpu'``, ``'torch-cuda'`` or ``'onnxruntime'`` (measured here), the path of a latency
            table, ``'kit:RESULTS.json'`` (a kit measured on another device), None (FLOPs and parameters only), or
            ``'auto'``: torch-cpu in fp32, onnxruntime in int8.
        precision: ``'fp32'``, or ``'int8'``: the latency table times QDQ graphs, the finalists are scored by the
            validation top-1 of their INT8 graph, the winners are exported as ``onnx-int8`` too, and the report gives
            their INT8 test top-1 beside the FP32 one.
        quantize: How INT8 graphs are calibrated (training images only).
        pretrained: Start from the model's pretrained weights.
        pretrained_file: Start from these local weights (timm weights of the source model, or a checkpoint).
        checkpoint: A trained supernet (``supernet.safetensors``): the train step uses it instead of training.
        resolutions: Elastic resolutions (default: the model's).
        image_size: Side the loaders produce (default: the largest resolution).
        dataset: timm dataset name ('' for an ImageFolder).
        train_split: Training split name.
        val_split: Validation split name.
        test_dir: An ImageFolder of test images; default: carved from the validation split.
        test_fraction: Share of the validation split carved out as the test split.
        auto_augment: timm auto-augment policy for training.
        scale: Random-resized-crop area range.
        hflip: Horizontal-flip probability (0 for data that is not mirror-symmetric).
        schedule: ``'auto'``, a preset, or a YAML file.
        epochs_scale: Multiplies every stage's epochs.
        min_steps: The schedule's floor in optimizer steps (default: the recipe's).
        lr_scale: Multiplies every stage's learning rate.
        sampling: Sampling rule of every stage (``'uniform'`` or ``'sandwich'``; default: each stage's own).
        subnets: Random subnets in the accuracy dataset.
        finalists: Candidates per budget measured on the validation split.
        formats: Export formats (``timm``, ``safetensors``, ``onnx``, ``onnx-int8``, ``pt2``).
        latency_batch_size: Batch size the latency is measured at.
        latency_threads: Intra-op threads for latency (default: PyTorch's).
        calibrate: Calibration subnets of a latency table built here.
        validate: Held-out subnets of a latency table built here.
        train: Training settings (its ``output`` and ``seed`` are set by the run).
        seed: Seed of everything: training, subnet draws, the test split, the search.
        progress: Progress bars (the run's step lines are printed either way).
    """
    model: str
    data_dir: str
    budgets: Union[str, Sequence[Union[str, Budget]]]
    out: str = 'ofa_run'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    latency: Optional[str] = 'auto'
    precision: str = 'fp32'
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    pretrained: bool = False
    pretrained_file: Optional[str] = None
    checkpoint: Optional[str] = None
    resolutions: Optional[Sequence[int]] = None
    image_size: Optional[int] = None
    dataset: str = ''
    train_split: str = 'train'
    val_split: str = 'validation'
    test_dir: Optional[str] = None
    test_fraction: float = 0.5
    auto_augment: Optional[str] = None
    scale: Tuple[float, float] = IMAGENET_SCALE
    hflip: float = 0.5
    schedule: str = 'auto'
    epochs_scale: Optional[float] = None
    min_steps: Optional[int] = None
    lr_scale: float = 1.0
    sampling: Optional[str] = None
    subnets: int = DEFAULT_SUBNETS
    finalists: int = 5
    formats: Sequence[str] = ('timm', 'onnx')
    latency_batch_size: int = 1
    latency_threads: Optional[int] = None
    calibrate: int = 10
    validate: int = 20
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.budgets = parse_budgets(self.budgets)
        if self.subnets < 10:
            raise ValueError(f'subnets must be >= 10 (the predictor holds 20% of them out), got {self.subnets}')
        if self.finalists < 1:
            raise ValueError(f'finalists must be >= 1, got {self.finalists}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'Unknown precision {self.precision!r}; allowed: {list(PRECISIONS)}')
        if self.latency == 'auto':
            self.latency = 'onnxruntime' if self.precision == 'int8' else 'torch-cpu'
        if self.precision == 'int8':
            from ..search.quantize import require_quantization
            require_quantization()
            if self.latency in ('torch-cpu', 'torch-cuda'):
                raise ValueError(f'An int8 run times the QDQ graphs onnxruntime runs: pass latency=onnxruntime (or a '
                                 f'table / kit results measured in int8), not {self.latency}')
            self.formats = tuple(dict.fromkeys([*self.formats, 'onnx-int8']))
        if self.latency is not None and self.latency not in LOCAL_BACKENDS and not (
                self.latency.startswith('kit:') or self.latency.endswith('.json')):
            raise ValueError(f"latency must be one of {list(LOCAL_BACKENDS)}, a table's .json path, "
                             f"'kit:RESULTS.json' or None, got {self.latency!r}")
        needs = {c for b in self.budgets for c in b.costs}
        if 'latency' in needs and self.latency is None:
            raise ValueError(f'Latency budgets ({", ".join(b.label for b in self.budgets)}) need a latency table: '
                             f'pass latency=torch-cpu (or a table / kit results)')

    @property
    def _imagenet_crop(self) -> bool:
        return tuple(self.scale) == IMAGENET_SCALE

    def augmentation(self) -> str:
        """The training augmentation in words, with the flag that changes what data may not want: flips cannot be
        inferred from the images (wrong for digits and text), and timm's ImageNet crop keeps as little as 8 % of a
        small image."""
        lo, hi = self.scale
        flips = (f'horizontal flips {self.hflip:.0%} of the time (--hflip 0 turns them off: wrong for digits, text '
                 f'and anything a mirror changes)' if self.hflip else 'no flips')
        crop = f'random-resized crops of {lo:.0%}-{hi:.0%} of each image'
        if self._imagenet_crop:
            crop += " (ImageNet's; --scale 0.6 1 keeps more of a small image)"
        return f'{crop}, {flips}, batch {self.train.batch_size}'

    def what_to_try(self) -> List[str]:
        """Flags that commonly lift a weak full stage (the teacher every subnet learns from), given these settings."""
        tips = []
        if self.hflip:
            tips.append('`--hflip 0` if a mirror changes the class (digits, text)')
        if self._imagenet_crop:
            tips.append('`--scale 0.6 1` for small images')
        if not (self.pretrained or self.pretrained_file or self.checkpoint):
            tips.append('`--pretrained` (or `--pretrained-file`) where weights of this model exist')
        # On a few hundred images per class a longer full stage ended lower (docs/results.md, the budget curve).
        tips.append('a longer run (`--epochs-scale 2`) if there are thousands of images per class')
        return tips


@dataclass
class BudgetResult:
    """The subnet exported for one budget, and how it does.

    Args:
        label: The budget's name (``latency_10ms``).
        limits: The budget's absolute limits by cost.
        subnet: The winner.
        predicted_top1: Its predicted top-1 (%).
        val_top1: Its top-1 on the validation split (what chose it among the finalists).
        test_top1: Its top-1 on the test split.
        test_top5: Its top-5 on the test split.
        costs: FLOPs, parameters and predicted latency (ms).
        latency_measured: Its latency measured here at the table's settings (ms), where the table is local.
        random_best: The best of the randomly evaluated subnets that meet the budget (by validation top-1): its
            ``subnet``, ``val_top1`` and ``test_top1``.
        files: The exported files.
        load: A line that loads the subnet in timm.
        latency: Its latency timed here against the table's anchors (``table_ms`` with its 95 % interval
            ``low_ms``-``high_ms``, ``measured_ms`` as the clock read it, ``drift``, ``over_budget_pct``), where the
            table is local.
        test_top1_int8: Its INT8 graph's test top-1 (an int8 run).
        fp32_choice: In an int8 run, the finalist FP32 validation top-1 would have chosen, where it is another
            subnet: its ``subnet``, ``val_top1``, ``val_top1_int8``, ``test_top1`` and ``test_top1_int8``.
    """
    label: str
    limits: Dict[str, float]
    subnet: Subnet
    predicted_top1: float
    val_top1: float
    test_top1: float
    test_top5: float
    costs: Dict[str, float]
    latency_measured: Optional[float]
    random_best: Optional[Dict[str, Any]]
    files: List[str]
    load: str
    latency: Optional[Dict[str, float]] = None
    test_top1_int8: Optional[float] = None
    fp32_choice: Optional[Dict[str, Any]] = None


@dataclass
class PipelineResult:
    """What a run produced.

    Args:
        out: The work folder.
        budgets: One result per budget.
        predictor: The predictor's held-out scores (``rmse``, ``spearman``, ``n_train``, ``n_val``).
        latency: The latency table's description and validation, or None.
        data: Split sizes.
        train: The training summary.
        report: ``report.md``.
        plot: ``pareto.png``.
    """
    out: Path
    budgets: List[BudgetResult]
    predictor: Dict[str, Any]
    latency: Optional[Dict[str, Any]]
    data: Dict[str, int]
    train: Dict[str, Any]
    report: Path
    plot: Path


class PipelineInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; rerunning the same command continues it.

    Args:
        signum: The signal.
        step: The step it stopped in.
    """

    def __init__(self, signum: int, step: str, detail: str = ''):
        self.signum, self.step = signum, step
        super().__init__(f'{signal.Signals(signum).name}: stopped in step {step!r}'
                         + (f'; {detail}' if detail else '; what it wrote is kept') + ', and a rerun continues it')


def demo_config(data_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], image_size: int = 32,
                **overrides: Any) -> RunConfig:
    """The run of ``ofa-timm demo`` on the digits ImageFolder ``data_dir`` (``make_digits_dataset``) written at
    ``image_size``: resolutions at 3/4, 7/8 and 1 of it, FLOPs and latency budgets, small-image augmentation;
    ``overrides`` replace any field (``model``, ``seed``, ``subnets``, ...)."""
    size = image_size
    config = dict(
        model='ofa_mobilenetv3_large_100', data_dir=str(data_dir), out=str(out),
        budgets='25%flops,50%flops,25%latency,50%latency', latency='auto',
        resolutions=(size * 3 // 4, size * 7 // 8, size), image_size=size, scale=(0.6, 1.0), hflip=0.,
        formats=('timm', 'onnx'),
        # Validation during training at stage ends only, at the largest resolution: each subnet costs a BN
        # recalibration and an evaluation, so a denser grid would cost more than the training.
        train=TrainConfig(batch_size=32, workers=0, calib_images=256, val_resolutions=[size], val_every=1000,
                          log_every=5))
    return RunConfig(**{**config, **overrides})


