"""From a timm model and a dataset to a tested, exported subnet per budget, in one resumable run.

Steps, each writing its files into the work folder and recording the inputs it used (``WorkDir``):

1. ``train``: progressive shrinking (``Trainer``; DDP under ``torchrun``), or a given trained checkpoint.
2. ``latency``: a latency table measured on this machine (``torch-cpu``, ``torch-cuda``, ``onnxruntime``), read from
   a file, or imported from a latency kit measured on another device (``kit:results.json``).
3. ``accuracy``: random subnets, BN-recalibrated and evaluated on the validation split (sharded across ranks).
4. ``predictor``: the accuracy predictor fitted on them (held-out RMSE and Spearman).
5. ``search``: constrained evolution per budget; the best ``finalists`` distinct candidates of each.
6. ``finalists``: each candidate evaluated on the validation split (sharded); the best measured one wins, so that a
   predictor's ranking error cannot pick a bad subnet.
7. ``export``: each winner, BN-recalibrated, as a timm folder, ONNX, ...
8. ``report``: each winner's top-1 on the test split, which nothing else saw, against the best random subnet that
   meets the same budget; its latency predicted and measured here; ``report.md`` and ``pareto.png``.

The test split is carved from the validation data (stratified, fixed by the seed) or given as ``test_dir``, and is
read by the report alone.
"""
import contextlib
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from .._dist import barrier as _barrier, rank_and_world as _dist
from .._io import save_supernet
from .._lock import folder_lock
from ..search.budget import Budget, parse_budgets
from ..space import Subnet
from ..training import DataConfig, SubnetEvaluator, TrainConfig
from .workdir import WorkDir, canonical, file_digest

__all__ = ['STEPS', 'RunConfig', 'BudgetResult', 'PipelineResult', 'PipelineInterrupted', 'run', 'DEFAULT_SUBNETS',
           'demo_config']

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
        data_dir: Dataset root: an ImageFolder with ``train`` and ``validation`` folders, or a timm dataset root with
            ``dataset``.
        budgets: One per exported subnet (``'5ms,10ms,20ms'``, ``'300MFLOPs'``, ``'10ms+300MFLOPs'``,
            ``'25%latency'``; see ``ofa_timm.search.parse_budgets``).
        out: The work folder.
        latency: ``'torch-cpu'``, ``'torch-cuda'`` or ``'onnxruntime'`` (measured here), the path of a latency
            table, ``'kit:RESULTS.json'`` (a kit measured on another device), or None (FLOPs and parameters only).
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
        subnets: Random subnets in the accuracy dataset.
        finalists: Candidates per budget measured on the validation split.
        formats: Export formats (``timm``, ``safetensors``, ``onnx``, ``pt2``).
        latency_batch_size: Batch size the latency is measured at.
        latency_threads: Intra-op threads for latency (default: PyTorch's).
        calibrate: Calibration subnets of a latency table built here.
        validate: Held-out subnets of a latency table built here.
        train: Training settings (its ``output`` and ``seed`` are set by the run).
        seed: Seed of everything: training, subnet draws, the test split, the search.
        progress: Progress bars and lines.
    """
    model: str
    data_dir: str
    budgets: Union[str, Sequence[Union[str, Budget]]]
    out: str = 'ofa_run'
    latency: Optional[str] = 'torch-cpu'
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
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    schedule: str = 'auto'
    epochs_scale: Optional[float] = None
    min_steps: Optional[int] = None
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
        if self.latency is not None and self.latency not in LOCAL_BACKENDS and not (
                self.latency.startswith('kit:') or self.latency.endswith('.json')):
            raise ValueError(f"latency must be one of {list(LOCAL_BACKENDS)}, a table's .json path, "
                             f"'kit:RESULTS.json' or None, got {self.latency!r}")
        needs = {c for b in self.budgets for c in b.costs}
        if 'latency' in needs and self.latency is None:
            raise ValueError(f'Latency budgets ({", ".join(b.label for b in self.budgets)}) need a latency table: '
                             f'pass latency=torch-cpu (or a table / kit results)')


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


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


class Pipeline:
    """Runs the steps of :func:`run` (one instance per process; under ``torchrun`` every rank makes one)."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.rank, self.world = _dist()
        self.is_main = self.rank == 0
        self.out = Path(config.out)
        self.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if torch.cuda.is_available() \
            else torch.device('cpu')
        self.work: Optional[WorkDir] = None
        self.started = time.time()
        self.timings: Dict[str, float] = {}
        self.summaries: Dict[str, Dict[str, Any]] = {}
        self._step_name = ''

    # --- orchestration -------------------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        if self.is_main and self.config.progress:
            print(text, flush=True)

    def run(self, until: Optional[str] = None) -> Optional[PipelineResult]:
        if until is not None and until not in STEPS:
            raise ValueError(f'Unknown step {until!r}; steps: {list(STEPS)}')
        last = STEPS.index(until) if until else len(STEPS) - 1
        lock = folder_lock(self.out) if self.is_main else contextlib.nullcontext()
        with lock, self._stop_on_signals():
            self.work = WorkDir(self.out) if self.is_main else None
            _barrier()
            self.work = self.work or WorkDir(self.out)
            self._prepare()
            for index, name in enumerate(STEPS[:last + 1]):
                self._step_name = name
                getattr(self, f'_step_{name}')(index)
            self._step_name = ''
        return self.result if until is None or until == STEPS[-1] else None

    def _prepare(self) -> None:
        import ofa_timm  # noqa: F401  registers the ofa_* models
        from .data import load_splits
        cfg = self.config
        if not cfg.model.startswith('ofa_'):
            raise ValueError(f"model must be a registered ofa_* name (see timm.list_models('ofa_*')), got "
                             f'{cfg.model!r}')
        import timm
        if not timm.is_model(cfg.model):
            raise ValueError(f"Unknown model {cfg.model!r}; see timm.list_models('ofa_*')")
        size = cfg.image_size or (max(cfg.resolutions) if cfg.resolutions else
                                  max(timm.create_model(cfg.model, pretrained=False).space.resolutions or (224,)))
        data_cfg = DataConfig(cfg.data_dir, dataset=cfg.dataset, train_split=cfg.train_split,
                              val_split=cfg.val_split, image_size=size, auto_augment=cfg.auto_augment,
                              scale=tuple(cfg.scale), hflip=cfg.hflip)
        self.splits = load_splits(data_cfg, cfg.test_dir, cfg.test_fraction, cfg.seed)
        s = self.splits
        self.data_sizes = dict(train=len(s.train), val=len(s.val), test=len(s.test), classes=s.num_classes)
        self.log(f'Data: {len(s.train):,} training / {len(s.val):,} validation / {len(s.test):,} test images, '
                 f'{s.num_classes} classes (test split: '
                 f'{cfg.test_dir or f"{cfg.test_fraction:.0%} of the validation split, stratified, seed {cfg.seed}"}, '
                 f'read by the report alone)')

    def _step(self, index: int, name: str, inputs: Dict[str, Any], work: Callable[[bool], Tuple[
            Dict[str, Any], List[Path]]], what: str, main_only: bool = False) -> Dict[str, Any]:
        """Run step ``name`` unless it is done with ``inputs``; returns its summary."""
        head = f'[{index + 1}/{len(STEPS)}] {name}'
        from .. import __version__
        inputs = dict(inputs, ofa_timm=__version__)  # another version may compute any step differently
        done = self.work.done(name, inputs)
        if done is not None:
            self.summaries[name] = done['summary']
            self.timings[name] = 0.0
            self.log(f'{head}: done before, inputs unchanged ({what})')
            return done['summary']
        record = self.work.record(name)
        resumable = record is not None and record.get('inputs') == canonical(inputs)
        _barrier()
        if self.is_main:
            self.work.begin(name, inputs)
        _barrier()
        self.log(f'{head}: {what}' + (' (continuing)' if resumable else ''))
        start = time.time()
        summary, outputs = ({}, []) if main_only and not self.is_main else work(resumable)
        _barrier()
        if main_only and self.world > 1:  # the other ranks take the summary from the record rank 0 wrote
            summary = self._broadcast(summary)
        seconds = time.time() - start
        if self.is_main:
            self.work.finish(name, inputs, outputs, summary, seconds)
        _barrier()
        self.summaries[name], self.timings[name] = summary, seconds
        left = self._estimate_left(index)
        self.log(f'{head}: done in {_fmt_s(seconds)} (elapsed {_fmt_s(time.time() - self.started)}'
                 + (f', about {_fmt_s(left)} left)' if left is not None else ')'))
        return summary

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _estimate_left(self, index: int) -> Optional[float]:
        """Seconds the remaining steps should take, from the time one evaluation took; None before it is known."""
        per_eval = self.summaries.get('accuracy', {}).get('seconds_per_subnet')
        if per_eval is None or 'train' not in self.timings:
            return None
        cfg, n_budgets = self.config, len(self.config.budgets)
        test_eval = per_eval * len(self.splits.test) / max(1, len(self.splits.val))
        estimate = {'latency': 0.0, 'accuracy': cfg.subnets * per_eval / self.world, 'predictor': 5.0,
                    'search': 1.0 * n_budgets, 'finalists': cfg.finalists * n_budgets * per_eval / self.world,
                    'export': 2.0 * n_budgets * len(cfg.formats), 'report': 2 * n_budgets * test_eval + 5.0}
        return sum(estimate.get(s, 0.0) for s in STEPS[index + 1:])

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM stop the run at once (the trainer installs its own handler while it trains: it finishes
        the step and checkpoints); every step writes as it goes, so a rerun continues."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            raise PipelineInterrupted(signum, self._step_name or 'setup')

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    # --- helpers -------------------------------------------------------------------------------------------------
    def _evaluator(self, split: str) -> SubnetEvaluator:
        t = self.config.train
        data = self.splits.val if split == 'val' else self.splits.test
        return SubnetEvaluator(self.splits.calib, data, t.calib_images, t.batch_size, self.config.seed, t.workers,
                               self.device)

    @property
    def supernet_path(self) -> Path:
        return self.out / 'train' / 'supernet.safetensors'

    def _load_supernet(self) -> torch.nn.Module:
        from ..search.export import load_supernet
        return load_supernet(self.config.model, self.supernet_path).to(self.device).eval()

    def _cost_models(self) -> Dict[str, Any]:
        from ..search import flops_model, params_model
        from ..search.latency import LatencyTable
        models = {'flops': flops_model(self.supernet), 'params': params_model(self.supernet)}
        if self.table_path is not None:
            models['latency'] = LatencyTable.load(self.table_path, space=self.supernet.space)
        return models

    # --- the steps -----------------------------------------------------------------------------------------------
    def _step_train(self, index: int) -> None:
        from ..training import load_schedule
        cfg = self.config
        if cfg.checkpoint:
            inputs = dict(checkpoint=file_digest(cfg.checkpoint), model=cfg.model)

            def use(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
                if self.is_main:
                    self.supernet_path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(cfg.checkpoint, self.supernet_path)
                return dict(checkpoint=str(cfg.checkpoint)), [self.supernet_path]
            self._step(index, 'train', inputs, use, f'the trained supernet {cfg.checkpoint}', main_only=True)
        else:
            pretrained = cfg.pretrained or bool(cfg.pretrained_file)
            schedule = load_schedule(cfg.schedule, cfg.epochs_scale, pretrained=pretrained)
            if cfg.min_steps is not None:
                from dataclasses import replace
                schedule = replace(schedule, min_steps=cfg.min_steps)
            skip = ('output', 'progress', 'progress_seconds', 'log_every', 'checkpoint_every', 'checkpoint_minutes',
                    'workers', 'seed')
            inputs = dict(model=cfg.model, pretrained=cfg.pretrained, resolutions=cfg.resolutions,
                          pretrained_file=file_digest(cfg.pretrained_file) if cfg.pretrained_file else None,
                          schedule=schedule.to_dict(), train={k: v for k, v in asdict(cfg.train).items()
                                                              if k not in skip},
                          data=self.splits.fingerprint, seed=cfg.seed, world_size=self.world)
            self._step(index, 'train', inputs, lambda resumable: self._train(schedule, pretrained, resumable),
                       f'progressive shrinking of {cfg.model}')
        self.supernet = self._load_supernet()

    def _train(self, schedule: Any, pretrained: bool, resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
        import timm
        from dataclasses import replace
        from ..training import Trainer
        from ..training.report import write_run_report
        cfg = self.config
        run_dir = self.out / 'train'
        if not resumable and self.is_main and run_dir.exists():
            shutil.rmtree(run_dir)  # another run's checkpoint: its inputs changed
        _barrier()
        kwargs: Dict[str, Any] = dict(num_classes=self.splits.num_classes)
        if cfg.resolutions:
            kwargs['resolutions'] = tuple(cfg.resolutions)
        if cfg.pretrained_file:
            kwargs['pretrained_cfg_overlay'] = dict(file=cfg.pretrained_file)
        torch.manual_seed(cfg.seed)
        supernet = timm.create_model(cfg.model, pretrained=pretrained, **kwargs)
        train_cfg = replace(cfg.train, output=str(run_dir), seed=cfg.seed, progress=cfg.progress)
        trainer = Trainer(supernet, schedule, self.splits.train, self.splits.val, self.splits.calib, train_cfg,
                          pretrained=pretrained)
        if (run_dir / 'last.pth').is_file():
            trainer.resume()
            self.log(f'      resuming at {trainer.where()}')
        self.log('      ' + trainer.describe_schedule().replace('\n', '\n      '))
        trainer.run()
        summaries = trainer.summaries()
        if self.is_main:
            save_supernet(trainer.supernet, self.supernet_path)
            write_run_report(summaries, run_dir)
        steps = trainer.position.global_step
        return dict(steps=steps, stages=[dict(stage=s['stage'], top1=s['top1'], min_top1=s['min_top1'],
                                              max_top1=s['max_top1']) for s in summaries]), [self.supernet_path]

    def _step_latency(self, index: int) -> None:
        cfg = self.config
        self.table_path: Optional[Path] = None
        if cfg.latency is None:
            self.log(f'[{index + 1}/{len(STEPS)}] latency: skipped (no latency table; FLOPs and parameters only)')
            return
        path = self.out / 'latency' / 'table.json'
        spec = cfg.latency
        inputs: Dict[str, Any] = dict(latency=spec, model=cfg.model, space=self.supernet.space.to_dict())
        if spec in LOCAL_BACKENDS:
            inputs.update(batch_size=cfg.latency_batch_size, threads=cfg.latency_threads, calibrate=cfg.calibrate,
                          validate=cfg.validate, seed=cfg.seed)
            what = f'a {spec} latency table measured here (batch {cfg.latency_batch_size})'
        elif spec.startswith('kit:'):
            results = Path(spec[4:])
            inputs.update(results=file_digest(results), manifest=file_digest(results.parent / 'manifest.json'))
            what = f'the latency kit results {results}'
        else:
            inputs.update(table=file_digest(spec))
            what = f'the latency table {spec}'

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            from ..search.latency import LatencySettings, LatencyTable, build_latency_table
            path.parent.mkdir(parents=True, exist_ok=True)
            if not resumable:
                path.unlink(missing_ok=True)
            if spec in LOCAL_BACKENDS:
                settings = LatencySettings(spec, cfg.latency_batch_size, cfg.latency_threads)
                table = build_latency_table(self.supernet, path, settings, calibrate=cfg.calibrate, seed=cfg.seed,
                                            model=cfg.model, progress=cfg.progress, validate=cfg.validate)
            elif spec.startswith('kit:'):
                from ..search.kit import import_kit_results
                table = import_kit_results(spec[4:])
                if table.space != self.supernet.space:
                    raise ValueError(f'The kit {spec[4:]} was made for another space than {cfg.model} has')
            else:
                table = LatencyTable.load(spec, space=self.supernet.space)
            table.save(path)
            return dict(describe=table.describe(), validation=_brief(table.validation),
                        minimum=table.minimum()[0], maximum=table.maximum()[0]), [path]
        self._step(index, 'latency', inputs, work, what, main_only=True)
        self.table_path = path

    def _step_accuracy(self, index: int) -> None:
        from ..search.predictor import (
            build_accuracy_dataset, read_accuracy_dataset, sample_subnets, write_accuracy_dataset, _read_rows)
        cfg = self.config
        folder = self.out / 'accuracy'
        path = folder / 'accuracy.jsonl'
        inputs = dict(supernet=file_digest(self.supernet_path), n=cfg.subnets, seed=cfg.seed,
                      calib_images=cfg.train.calib_images, data=self.splits.fingerprint)

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            if not resumable and self.is_main and folder.exists():
                shutil.rmtree(folder)
            _barrier()
            space = self.supernet.space
            subnets = sample_subnets(space, cfg.subnets, cfg.seed)
            evaluator = self._evaluator('val')
            shard = path if self.world == 1 else folder / f'accuracy.rank{self.rank}.jsonl'
            start = time.time()
            rows = build_accuracy_dataset(self.supernet, None, None, shard, subnets=subnets[self.rank::self.world],
                                          progress=cfg.progress and self.is_main, model=cfg.model,
                                          evaluate=lambda s: evaluator(self.supernet, s))
            per_subnet = (time.time() - start) / max(1, len(rows))
            _barrier()
            if self.world > 1 and self.is_main:  # rank 0 merges the shards, in the order of the draw
                by_subnet = {}
                for r in range(self.world):
                    for row in _read_rows(folder / f'accuracy.rank{r}.jsonl', space):
                        by_subnet[Subnet.from_dict(row['subnet'])] = row
                write_accuracy_dataset(path, space, [by_subnet[s] for s in subnets], cfg.model)
            _barrier()
            _, top1 = read_accuracy_dataset(path, space)
            return dict(n=len(top1), top1_min=float(top1.min()), top1_max=float(top1.max()),
                        seconds_per_subnet=per_subnet), [path]
        self._step(index, 'accuracy', inputs, work,
                   f'{cfg.subnets} random subnets, each BN-recalibrated and evaluated on the validation split')
        self.accuracy_path = path

    def _step_predictor(self, index: int) -> None:
        from ..search import AccuracyPredictor, FitConfig, fit_predictor, read_accuracy_dataset
        path = self.out / 'predictor.safetensors'
        fit = FitConfig(seed=self.config.seed)
        inputs = dict(dataset=file_digest(self.accuracy_path), fit=asdict(fit))

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            codes, targets = read_accuracy_dataset(self.accuracy_path, self.supernet.space)
            predictor, metrics = fit_predictor(self.supernet.space, codes, targets, fit)
            predictor.save(path, model=self.config.model)
            return dict(metrics), [path]
        summary = self._step(index, 'predictor', inputs, work, 'the accuracy predictor (20% of the subnets held out)',
                             main_only=True)
        self.log(f"      held-out RMSE {summary['rmse']:.2f} points, Spearman {summary['spearman']:.3f} "
                 f"({summary['n_val']} of {summary['n_val'] + summary['n_train']} subnets)")
        self.predictor = AccuracyPredictor.load(path, space=self.supernet.space)
        self.predictor_path = path

    def _step_search(self, index: int) -> None:
        from .._io import write_text_atomic
        from ..search import EvolutionConfig, specialize
        import json
        cfg = self.config
        path = self.out / 'search.json'
        evolution = EvolutionConfig()
        inputs = dict(predictor=file_digest(self.predictor_path), budgets=[
            dict(limits=b.limits, relative=b.relative) for b in cfg.budgets],
            table=file_digest(self.table_path) if self.table_path else None, evolution=asdict(evolution),
            finalists=cfg.finalists, seed=cfg.seed)

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            models = self._cost_models()
            limits = [b.resolve(models) for b in cfg.budgets]
            results = specialize(self.supernet, self.predictor, models, limits, evolution, seed=cfg.seed)
            space = self.supernet.space
            out = []
            for budget, limit, r in zip(cfg.budgets, limits, results):
                order = np.argsort(-r.population_accuracy, kind='stable')
                seen, candidates = set(), []
                for i in order:
                    code = tuple(r.population[i])
                    if code in seen or any(r.population_costs[k][i] > v for k, v in limit.items()):
                        continue
                    seen.add(code)
                    candidates.append(dict(subnet=space.decode(r.population[i]).to_dict(),
                                           predicted=float(r.population_accuracy[i]),
                                           costs={k: float(v[i]) for k, v in r.population_costs.items()}))
                    if len(candidates) == cfg.finalists:
                        break
                out.append(dict(label=budget.label, limits=limit, candidates=candidates))
            write_text_atomic(path, json.dumps(out, indent=1) + '\n')
            return dict(budgets=[dict(label=o['label'], limits=o['limits'], best_predicted=o['candidates'][0][
                'predicted']) for o in out]), [path]
        self._step(index, 'search', inputs, work, f'{len(cfg.budgets)} budgets: '
                   f'{", ".join(b.label for b in cfg.budgets)}', main_only=True)
        self.search_path = path

    def _step_finalists(self, index: int) -> None:
        import json
        from .._io import write_text_atomic
        from ..search.predictor import build_accuracy_dataset, _read_rows
        cfg = self.config
        folder = self.out / 'finalists'
        path = folder / 'finalists.json'
        inputs = dict(supernet=file_digest(self.supernet_path), search=file_digest(self.search_path),
                      calib_images=cfg.train.calib_images, data=self.splits.fingerprint)

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            if not resumable and self.is_main and folder.exists():
                shutil.rmtree(folder)
            _barrier()
            space = self.supernet.space
            search = json.loads(self.search_path.read_text())
            unique = list(dict.fromkeys(Subnet.from_dict(c['subnet']) for b in search for c in b['candidates']))
            evaluator = self._evaluator('val')
            build_accuracy_dataset(self.supernet, None, None, folder / f'evaluated.rank{self.rank}.jsonl',
                                   subnets=unique[self.rank::self.world], progress=cfg.progress and self.is_main,
                                   model=cfg.model, evaluate=lambda s: evaluator(self.supernet, s))
            _barrier()
            out = []
            if self.is_main:
                measured = {}
                for r in range(self.world):
                    for row in _read_rows(folder / f'evaluated.rank{r}.jsonl', space):
                        measured[Subnet.from_dict(row['subnet'])] = row['top1']
                for b in search:
                    for c in b['candidates']:
                        c['val_top1'] = measured[Subnet.from_dict(c['subnet'])]
                    # the best measured wins; ties go to the higher prediction
                    winner = max(b['candidates'], key=lambda c: (c['val_top1'], c['predicted']))
                    out.append(dict(b, winner=winner))
                write_text_atomic(path, json.dumps(out, indent=1) + '\n')
            return dict(winners=[dict(label=o['label'], val_top1=o['winner']['val_top1'],
                                      predicted=o['winner']['predicted']) for o in out]), [path]
        self._step(index, 'finalists', inputs, work, f'the best {cfg.finalists} candidates of each budget, measured '
                   f'on the validation split')
        self.finalists_path = path

    def _step_export(self, index: int) -> None:
        import json
        from ..search.export import export_subnet
        cfg = self.config
        folder = self.out / 'export'
        inputs = dict(supernet=file_digest(self.supernet_path), finalists=file_digest(self.finalists_path),
                      formats=list(cfg.formats), calib_images=cfg.train.calib_images, seed=cfg.seed)

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            finalists = json.loads(self.finalists_path.read_text())
            calib = self._evaluator('val').calib
            files, exported = [], {}
            for b in finalists:
                result = export_subnet(self.supernet, b['winner']['subnet'], folder / b['label'], formats=cfg.formats,
                                       calib_loader=calib, calib_images=cfg.train.calib_images, model_name=cfg.model)
                exported[b['label']] = result['files']
                files.append(folder / b['label'])
            return dict(files=exported), files
        self._step(index, 'export', inputs, work, f'each winner, BN-recalibrated, as {", ".join(cfg.formats)}',
                   main_only=True)

    def _step_report(self, index: int) -> None:
        inputs = dict(finalists=file_digest(self.finalists_path), export=self.summaries['export'],
                      accuracy=file_digest(self.accuracy_path), table=file_digest(self.table_path)
                      if self.table_path else None, data=self.splits.fingerprint, predictor=self.summaries[
                          'predictor'])
        self._step(index, 'report', inputs, self._report, 'each winner on the test split, latency measured here, '
                   'report.md and pareto.png', main_only=True)
        if self.is_main:
            self.result = self._result_from_files()
        else:
            self.result = None

    def _report(self, resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
        import json
        from .._io import write_text_atomic
        from ..search.latency import measure_subnets, _settings_of
        from ..search.predictor import read_accuracy_dataset
        from .report import plot_report, report_markdown
        cfg = self.config
        space = self.supernet.space
        finalists = json.loads(self.finalists_path.read_text())
        models = self._cost_models()
        test = self._evaluator('test')
        codes, val_top1 = read_accuracy_dataset(self.accuracy_path, space)
        random_costs = {k: np.asarray(m(codes), dtype=np.float64) for k, m in models.items()}
        table = models.get('latency')
        local = table is not None and not table.meta.get('kit') and table.meta.get('backend') in LOCAL_BACKENDS \
            and (table.meta.get('backend') != 'torch-cuda' or torch.cuda.is_available())
        winners = [Subnet.from_dict(b['winner']['subnet']) for b in finalists]
        measured = measure_subnets(self.supernet, winners, _settings_of(table), progress=cfg.progress) if local \
            else [None] * len(winners)
        budgets = []
        for b, subnet, latency in zip(finalists, winners, measured):
            metrics = test(self.supernet, subnet)
            code = space.encode(subnet)
            costs = {k: float(m(code)[0]) for k, m in models.items()}
            ok = np.ones(len(codes), dtype=bool)
            for k, v in b['limits'].items():
                ok &= random_costs[k] <= v
            random_best = None
            if ok.any():
                i = int(np.flatnonzero(ok)[np.argmax(val_top1[ok])])
                rb = space.decode(codes[i])
                random_best = dict(subnet=rb.to_dict(), val_top1=float(val_top1[i]),
                                   test_top1=test(self.supernet, rb)['top1'])
            export = self.out / 'export' / b['label']
            budgets.append(dict(
                label=b['label'], limits=b['limits'], subnet=subnet.to_dict(), predicted_top1=b['winner']['predicted'],
                val_top1=b['winner']['val_top1'], test_top1=metrics['top1'], test_top5=metrics['top5'], costs=costs,
                latency_measured=None if latency is None else float(latency), random_best=random_best,
                files=sorted(str(p) for p in export.iterdir()) if export.is_dir() else [],
                load=self._load_line(export)))
        info = dict(model=cfg.model, data=self.data_sizes, train=self.summaries.get('train', {}),
                    predictor=self.summaries['predictor'], latency=self.summaries.get('latency'),
                    accuracy=self.summaries['accuracy'], budgets=budgets, test_source=cfg.test_dir or
                    f'{cfg.test_fraction:.0%} of the validation split (stratified, seed {cfg.seed})',
                    latency_measured_here=bool(local))
        results = self.out / 'results.json'
        write_text_atomic(results, json.dumps(info, indent=1) + '\n')
        plot = plot_report(info, models, self.predictor, self.out / 'pareto.png', seed=cfg.seed)
        report = write_text_atomic(self.out / 'report.md', report_markdown(info, plot.name))
        return dict(budgets=[dict(label=b['label'], test_top1=b['test_top1']) for b in budgets]), [
            results, plot, report]

    def _load_line(self, export: Path) -> str:
        """The Python that loads an exported subnet in timm."""
        if (export / 'config.json').is_file():
            return f"import timm, ofa_timm; model = timm.create_model('local-dir:{export}', pretrained=True)"
        return (f"import timm, ofa_timm; model = timm.create_model('{self.config.model}', "
                f"subnet='{export / 'subnet.json'}', pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='{self.supernet_path}'))")

    def _result_from_files(self) -> PipelineResult:
        import json
        info = json.loads((self.out / 'results.json').read_text())
        budgets = [BudgetResult(
            label=b['label'], limits=b['limits'], subnet=Subnet.from_dict(b['subnet']),
            predicted_top1=b['predicted_top1'], val_top1=b['val_top1'], test_top1=b['test_top1'],
            test_top5=b['test_top5'], costs=b['costs'], latency_measured=b['latency_measured'],
            random_best=b['random_best'], files=b['files'], load=b['load']) for b in info['budgets']]
        return PipelineResult(self.out, budgets, info['predictor'], info['latency'], info['data'], info['train'],
                              self.out / 'report.md', self.out / 'pareto.png')


def _brief(validation: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A table's validation without its per-subnet rows."""
    return None if validation is None else {k: v for k, v in validation.items() if k != 'rows'}


def demo_config(data_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], image_size: int = 32,
                **overrides: Any) -> RunConfig:
    """The run of ``ofa-timm demo`` on the digits ImageFolder ``data_dir`` (``make_digits_dataset``) written at
    ``image_size``: resolutions at 3/4, 7/8 and 1 of it, FLOPs and latency budgets, small-image augmentation;
    ``overrides`` replace any field (``model``, ``seed``, ``subnets``, ...)."""
    size = image_size
    config = dict(
        model='ofa_mobilenetv3_large_100', data_dir=str(data_dir), out=str(out),
        budgets='25%flops,50%flops,25%latency,50%latency', latency='torch-cpu',
        resolutions=(size * 3 // 4, size * 7 // 8, size), image_size=size, scale=(0.6, 1.0), hflip=0.,
        formats=('timm', 'onnx'),
        # Validation during training at stage ends only, at the largest resolution: each subnet costs a BN
        # recalibration and an evaluation, so a denser grid would cost more than the training.
        train=TrainConfig(batch_size=32, workers=0, calib_images=256, val_resolutions=[size], val_every=1000,
                          log_every=5))
    return RunConfig(**{**config, **overrides})


def run(config: Optional[RunConfig] = None, until: Optional[str] = None, **kwargs: Any) -> Optional[PipelineResult]:
    """Train, measure, search, choose, export and report: see the module's docstring.

    Call it with a :class:`RunConfig` or its fields as keywords::

        result = ofa_timm.run(model='ofa_mobilenetv3_large_100', data_dir='data/', budgets='5ms,10ms', out='work/')
        for b in result.budgets:
            print(b.label, b.test_top1, b.latency_measured, b.load)

    A rerun with the same work folder skips the steps that are done and still valid and continues a half-done one;
    changing an input reruns only the steps that depend on it (new budgets: search, finalists, export, report).
    Under ``torchrun`` (after ``torch.distributed.init_process_group``), training is DDP and the evaluations are
    shared out across ranks; rank 0 writes everything and gets the result (the other ranks get None).

    Args:
        config: The run's settings (or pass them as keywords).
        until: Stop after this step (one of :data:`STEPS`); None runs them all.

    Raises:
        ValueError: On bad settings, unreadable data, or a work folder another live process holds.
        PipelineInterrupted: On SIGINT/SIGTERM (a rerun continues); during training, the trainer's
            ``TrainingInterrupted`` after it checkpointed.
    """
    if config is None:
        config = RunConfig(**kwargs)
    elif kwargs:
        raise ValueError('Pass a RunConfig or keywords, not both')
    return Pipeline(config).run(until)
