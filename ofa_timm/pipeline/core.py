"""From a timm model and a dataset to a tested, exported subnet per budget, in one resumable run.

Steps, each writing its files into the work folder and recording the inputs it used (``WorkDir``):

1. ``train``: progressive shrinking (``Trainer``; DDP under ``torchrun``), or a given trained checkpoint.
2. ``latency``: a latency table measured on this machine (``torch-cpu``, ``torch-cuda``, ``onnxruntime``), read from
   a file, or imported from a latency kit measured on another device (``kit:results.json``).
3. ``accuracy``: random subnets, BN-recalibrated (where the family has batch norms) and evaluated on the validation
   split (sharded across ranks).
4. ``predictor``: the accuracy predictor fitted on them (held-out RMSE and Spearman).
5. ``search``: constrained evolution per budget; the best ``finalists`` distinct candidates of each.
6. ``finalists``: each candidate evaluated on the validation split (sharded); the best measured one wins, so that a
   predictor's ranking error cannot pick a bad subnet.
7. ``export``: each winner, BN-recalibrated, as a timm folder, ONNX, ...
8. ``report``: each winner's top-1 on the test split, which nothing else saw, against the best random subnet that
   meets the same budget; its latency predicted and measured here; ``report.md`` and ``pareto.png``.

The test split is carved from the validation data (stratified, fixed by the seed) or given as ``test_dir``, and is
read by the report alone. Each ``_step_<name>`` method says what its step reads (its inputs) and hands the work to a
function of ``steps.py``.
"""
import contextlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .._dist import barrier as _barrier, rank_and_world as _dist
from .._io import write_text_atomic
from .._lock import folder_lock
from ..space import Subnet
from ..training import DataConfig, SubnetEvaluator
from . import steps
from .config import (
    DEFAULT_SUBNETS, LOCAL_BACKENDS, STEPS, BudgetResult, PipelineInterrupted, PipelineResult, RunConfig, demo_config)
from .workdir import WorkDir, canonical, file_digest

__all__ = ['STEPS', 'RunConfig', 'BudgetResult', 'PipelineResult', 'PipelineInterrupted', 'run', 'DEFAULT_SUBNETS',
           'demo_config', 'Pipeline']

Work = Callable[[bool], Tuple[Dict[str, Any], List[Path]]]


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
        """One line of the run's account (rank 0), with or without progress bars."""
        if self.is_main:
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
        from ..search.export import load_supernet
        from .data import load_splits
        cfg = self.config
        # The space (of a randomly initialised supernet: no download) sets the loaders' size and the schedule.
        initial = load_supernet(cfg.model, resolutions=cfg.resolutions, model_kwargs=cfg.model_kwargs)
        self.space = initial.space
        size = cfg.image_size or max(self.space.resolutions or (initial.input_resolution,))
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
        self.log(f'Training augmentation: {cfg.augmentation()}')
        if not initial.has_batchnorm:
            self.log(f'{cfg.model} has no batch norm: its subnets are evaluated and exported without BN '
                     f'recalibration')

    def _step(self, index: int, name: str, inputs: Dict[str, Any], work: Work, what: str,
              main_only: bool = False) -> Dict[str, Any]:
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
            box = [summary]
            dist.broadcast_object_list(box, src=0)
            summary = box[0]
        seconds = time.time() - start
        if self.is_main:
            self.work.finish(name, inputs, outputs, summary, seconds)
        _barrier()
        self.summaries[name], self.timings[name] = summary, seconds
        left = self._estimate_left(index)
        self.log(f'{head}: done in {_fmt_s(seconds)} (elapsed {_fmt_s(time.time() - self.started)}'
                 + (f', about {_fmt_s(left)} left)' if left is not None else ')'))
        return summary

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

    # --- what the steps share ------------------------------------------------------------------------------------
    def _evaluator(self, split: str, int8: bool = False) -> SubnetEvaluator:
        """Top-1 of subnets on ``split`` (``'val'`` or ``'test'``), of their INT8 graph with ``int8``."""
        t = self.config.train
        data = self.splits.val if split == 'val' else self.splits.test
        return SubnetEvaluator(self.splits.calib, data, t.calib_images, t.batch_size, self.config.seed, t.workers,
                               self.device, quantize=self.config.quantize if int8 else None)

    @property
    def supernet_path(self) -> Path:
        return self.out / 'train' / 'supernet.safetensors'

    def _cost_models(self) -> Dict[str, Any]:
        from ..search import flops_model, params_model
        from ..search.latency import LatencyTable
        models = {'flops': flops_model(self.supernet), 'params': params_model(self.supernet)}
        if self.table_path is not None:
            models['latency'] = LatencyTable.load(self.table_path, space=self.supernet.space)
        return models

    def _evaluate_sharded(self, subnets: Sequence[Subnet], folder: Path, resumable: bool,
                          int8: bool = False) -> Dict[Subnet, Dict]:
        """Evaluate ``subnets`` (their INT8 graphs with ``int8``) on the validation split, shared out across ranks:
        each rank appends its share to ``folder/evaluated.rank{r}.jsonl`` as it goes (a rerun continues it), and every
        row comes back by subnet on rank 0 (nothing on the other ranks)."""
        from ..search.predictor import build_accuracy_dataset, read_accuracy_rows
        if not resumable and self.is_main and folder.exists():
            shutil.rmtree(folder)
        _barrier()
        evaluator = self._evaluator('val', int8)
        build_accuracy_dataset(self.supernet, None, None, folder / f'evaluated.rank{self.rank}.jsonl',
                               subnets=list(subnets)[self.rank::self.world], model=self.config.model,
                               progress=self.config.progress and self.is_main,
                               evaluate=lambda s: evaluator(self.supernet, s))
        _barrier()
        if not self.is_main:
            return {}
        return {Subnet.from_dict(row['subnet']): row for r in range(self.world)
                for row in read_accuracy_rows(folder / f'evaluated.rank{r}.jsonl', self.supernet.space)}

    # --- the steps -----------------------------------------------------------------------------------------------
    def _step_train(self, index: int) -> None:
        from ..search.export import load_supernet
        from ..training import build_schedule
        cfg = self.config
        if cfg.checkpoint:
            def use(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
                if self.is_main:
                    self.supernet_path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(cfg.checkpoint, self.supernet_path)
                return dict(checkpoint=str(cfg.checkpoint)), [self.supernet_path]
            self._step(index, 'train', dict(checkpoint=file_digest(cfg.checkpoint), model=cfg.model), use,
                       f'the trained supernet {cfg.checkpoint}', main_only=True)
        else:
            pretrained = cfg.pretrained or bool(cfg.pretrained_file)
            schedule = build_schedule(cfg.schedule, self.space, pretrained=pretrained, epochs_scale=cfg.epochs_scale,
                                      min_steps=cfg.min_steps, lr_scale=cfg.lr_scale, sampling=cfg.sampling)
            skip = ('output', 'progress', 'progress_seconds', 'log_every', 'checkpoint_every', 'checkpoint_minutes',
                    'workers', 'seed')
            inputs = dict(model=cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained,
                          resolutions=cfg.resolutions,
                          pretrained_file=file_digest(cfg.pretrained_file) if cfg.pretrained_file else None,
                          schedule=schedule.to_dict(),
                          train={k: v for k, v in asdict(cfg.train).items() if k not in skip},
                          data=self.splits.fingerprint, seed=cfg.seed, world_size=self.world)

            def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
                summary = steps.train_supernet(cfg, self.splits, schedule, pretrained, self.out / 'train',
                                               self.supernet_path, resumable, self.is_main, self.log)
                return summary, [self.supernet_path]
            self._step(index, 'train', inputs, work, f'progressive shrinking of {cfg.model}')
        self.supernet = load_supernet(cfg.model, self.supernet_path).to(self.device).eval()

    def _step_latency(self, index: int) -> None:
        cfg = self.config
        self.table_path: Optional[Path] = None
        if cfg.latency is None:
            self.log(f'[{index + 1}/{len(STEPS)}] latency: skipped (no latency table; FLOPs and parameters only)')
            return
        path = self.out / 'latency' / 'table.json'
        spec = cfg.latency
        inputs: Dict[str, Any] = dict(latency=spec, model=cfg.model, space=self.supernet.space.to_dict())
        if cfg.precision != 'fp32':  # named only then, so that the FP32 run folders written before stay done
            inputs.update(precision=cfg.precision)
        if spec in LOCAL_BACKENDS:
            inputs.update(batch_size=cfg.latency_batch_size, threads=cfg.latency_threads, calibrate=cfg.calibrate,
                          validate=cfg.validate, seed=cfg.seed)
            what = (f'a latency table of {cfg.precision.upper()} subnets measured here with {spec} '
                    f'(batch {cfg.latency_batch_size})')
        elif spec.startswith('kit:'):
            results = Path(spec[4:])
            inputs.update(results=file_digest(results), manifest=file_digest(results.parent / 'manifest.json'))
            what = f'the latency kit results {results}'
        else:
            inputs.update(table=file_digest(spec))
            what = f'the latency table {spec}'

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            table = steps.latency_table(spec, self.supernet, path, cfg, resumable)
            validation = None if table.validation is None else {
                k: v for k, v in table.validation.items() if k != 'rows'}
            return dict(describe=table.describe(), validation=validation, minimum=table.minimum()[0],
                        maximum=table.maximum()[0]), [path]
        self._step(index, 'latency', inputs, work, what, main_only=True)
        self.table_path = path

    def _step_accuracy(self, index: int) -> None:
        from ..search.predictor import read_accuracy_dataset, sample_subnets, write_accuracy_dataset
        cfg = self.config
        folder = self.out / 'accuracy'
        path = folder / 'accuracy.jsonl'
        inputs = dict(supernet=file_digest(self.supernet_path), n=cfg.subnets, seed=cfg.seed,
                      calib_images=cfg.train.calib_images, data=self.splits.fingerprint)

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            space = self.supernet.space
            subnets = sample_subnets(space, cfg.subnets, cfg.seed)
            start = time.time()
            rows = self._evaluate_sharded(subnets, folder / 'evaluated', resumable)
            per_subnet = (time.time() - start) / max(1, len(subnets) / self.world)
            if self.is_main:  # the dataset, in the order of the draw
                write_accuracy_dataset(path, space, [rows[s] for s in subnets], cfg.model)
            _barrier()
            _, top1 = read_accuracy_dataset(path, space)
            return dict(n=len(top1), top1_min=float(top1.min()), top1_max=float(top1.max()),
                        seconds_per_subnet=per_subnet), [path]
        recalibrated = 'BN-recalibrated and ' if self.supernet.has_batchnorm else ''
        self._step(index, 'accuracy', inputs, work,
                   f'{cfg.subnets} random subnets, each {recalibrated}evaluated on the validation split')
        self.accuracy_path = path

    def _step_predictor(self, index: int) -> None:
        from ..search import AccuracyPredictor, FitConfig, fit_predictor, read_accuracy_dataset
        path = self.out / 'predictor.safetensors'
        fit = FitConfig(seed=self.config.seed)

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            codes, targets = read_accuracy_dataset(self.accuracy_path, self.supernet.space)
            predictor, metrics = fit_predictor(self.supernet.space, codes, targets, fit)
            predictor.save(path, model=self.config.model)
            return dict(metrics), [path]
        summary = self._step(index, 'predictor', dict(dataset=file_digest(self.accuracy_path), fit=asdict(fit)),
                             work, 'the accuracy predictor (20% of the subnets held out)', main_only=True)
        self.log(f"      held-out RMSE {summary['rmse']:.2f} points, Spearman {summary['spearman']:.3f} "
                 f"({summary['n_val']} of {summary['n_val'] + summary['n_train']} subnets)")
        self.predictor = AccuracyPredictor.load(path, space=self.supernet.space)
        self.predictor_path = path

    def _step_search(self, index: int) -> None:
        from ..search import EvolutionConfig
        cfg = self.config
        path = self.out / 'search.json'
        inputs = dict(predictor=file_digest(self.predictor_path), budgets=[
            dict(limits=b.limits, relative=b.relative) for b in cfg.budgets],
            table=file_digest(self.table_path) if self.table_path else None, evolution=asdict(EvolutionConfig()),
            finalists=cfg.finalists, seed=cfg.seed)

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            out = steps.search_candidates(self.supernet, self.predictor, self._cost_models(), cfg.budgets,
                                          cfg.finalists, cfg.seed)
            write_text_atomic(path, json.dumps(out, indent=1) + '\n')
            return dict(budgets=[dict(label=o['label'], limits=o['limits'], best_predicted=o['candidates'][0][
                'predicted']) for o in out]), [path]
        self._step(index, 'search', inputs, work, f'{len(cfg.budgets)} budgets: '
                   f'{", ".join(b.label for b in cfg.budgets)}', main_only=True)
        self.search_path = path

    def _local_table(self) -> Optional[Any]:
        """The run's latency table if its subnets can be timed here (built here, not through a kit), else None."""
        models = self._cost_models()
        table = models.get('latency')
        if table is None or table.meta.get('kit') or table.meta.get('backend') not in LOCAL_BACKENDS or (
                table.meta.get('backend') == 'torch-cuda' and not torch.cuda.is_available()):
            return None
        return table

    def _step_finalists(self, index: int) -> None:
        cfg = self.config
        folder = self.out / 'finalists'
        path = folder / 'finalists.json'
        int8 = cfg.precision == 'int8'
        inputs = dict(supernet=file_digest(self.supernet_path), search=file_digest(self.search_path),
                      calib_images=cfg.train.calib_images, data=self.splits.fingerprint)
        if int8:
            inputs.update(precision=cfg.precision, quantize=cfg.quantize.to_dict())

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            search = json.loads(self.search_path.read_text())
            unique = list(dict.fromkeys(Subnet.from_dict(c['subnet']) for b in search for c in b['candidates']))
            measured = self._evaluate_sharded(unique, folder / 'evaluated', resumable)
            measured_int8 = self._evaluate_sharded(unique, folder / 'evaluated_int8', resumable, True) if int8 \
                else None
            out = []
            if self.is_main:
                latency = steps.time_candidates(search, self._local_table(), self.supernet, cfg.progress)
                out = steps.pick_winners(search, measured, measured_int8, latency)
                write_text_atomic(path, json.dumps(out, indent=1) + '\n')
            return dict(winners=[dict(label=o['label'], val_top1=o['winner']['val_top1'],
                                      predicted=o['winner']['predicted']) for o in out]), [path]
        what = 'FP32 and INT8 validation top-1' if int8 else 'the validation split'
        self._step(index, 'finalists', inputs, work, f'the best {cfg.finalists} candidates of each budget, measured '
                   f'on {what}; those of latency budgets timed here, and kept only if within the budget')
        self.finalists_path = path

    def _step_export(self, index: int) -> None:
        from ..search.export import export_subnet
        cfg = self.config
        folder = self.out / 'export'
        inputs = dict(supernet=file_digest(self.supernet_path), finalists=file_digest(self.finalists_path),
                      formats=list(cfg.formats), calib_images=cfg.train.calib_images, seed=cfg.seed)
        if 'onnx-int8' in cfg.formats:
            inputs.update(quantize=cfg.quantize.to_dict())

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            evaluator = self._evaluator('val')
            files, int8 = {}, {}
            for b in json.loads(self.finalists_path.read_text()):
                result = export_subnet(
                    self.supernet, b['winner']['subnet'], folder / b['label'], formats=cfg.formats,
                    calib_loader=evaluator.calib, calib_images=cfg.train.calib_images, model_name=cfg.model,
                    quantize=cfg.quantize, check_loader=evaluator.eval)
                files[b['label']] = result['files']
                if 'int8' in result:
                    int8[b['label']] = result['int8']
            return dict(files=files, **(dict(int8=int8) if int8 else {})), [folder / label for label in files]
        recalibrated = ', BN-recalibrated,' if self.supernet.has_batchnorm else ''
        self._step(index, 'export', inputs, work, f'each winner{recalibrated} as {", ".join(cfg.formats)}',
                   main_only=True)

    def _step_report(self, index: int) -> None:
        from ..search.predictor import read_accuracy_dataset
        cfg = self.config
        inputs = dict(finalists=file_digest(self.finalists_path), export=self.summaries['export'],
                      accuracy=file_digest(self.accuracy_path),
                      table=file_digest(self.table_path) if self.table_path else None, data=self.splits.fingerprint,
                      predictor=self.summaries['predictor'])

        def work(resumable: bool) -> Tuple[Dict[str, Any], List[Path]]:
            test = self._evaluator('test')
            info = dict(model=cfg.model, data=self.data_sizes, train=self.summaries.get('train', {}),
                        predictor=self.summaries['predictor'], latency=self.summaries.get('latency'),
                        accuracy=self.summaries['accuracy'], precision=cfg.precision,
                        augmentation=cfg.augmentation(), what_to_try=cfg.what_to_try(),
                        int8_export=self.summaries['export'].get('int8'), test_source=cfg.test_dir or
                        f'{cfg.test_fraction:.0%} of the validation split (stratified, seed {cfg.seed})')
            test_int8 = self._evaluator('test', True) if cfg.precision == 'int8' else None
            return steps.report_on_test_split(
                cfg, self.supernet, self.out, json.loads(self.finalists_path.read_text()), self._cost_models(),
                self.predictor, lambda s: test(self.supernet, s),
                read_accuracy_dataset(self.accuracy_path, self.supernet.space), info, self._load_line,
                self._local_table(), test_int8 and (lambda s: test_int8(self.supernet, s)))
        self._step(index, 'report', inputs, work, 'each winner on the test split, latency measured here, report.md '
                   'and pareto.png', main_only=True)
        self.result = self._result_from_files() if self.is_main else None

    def _load_line(self, export: Path) -> str:
        """The Python that loads an exported subnet in timm."""
        if (export / 'config.json').is_file():
            return f"import timm, ofa_timm; model = timm.create_model('local-dir:{export}', pretrained=True)"
        return (f"import timm, ofa_timm; model = timm.create_model('{self.config.model}', "
                f"subnet='{export / 'subnet.json'}', pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='{self.supernet_path}'))")

    def _result_from_files(self) -> PipelineResult:
        info = json.loads((self.out / 'results.json').read_text())
        budgets = [BudgetResult(
            label=b['label'], limits=b['limits'], subnet=Subnet.from_dict(b['subnet']),
            predicted_top1=b['predicted_top1'], val_top1=b['val_top1'], test_top1=b['test_top1'],
            test_top5=b['test_top5'], costs=b['costs'], latency_measured=b['latency_measured'],
            random_best=b['random_best'], files=b['files'], load=b['load'], latency=b.get('latency'),
            test_top1_int8=b.get('test_top1_int8'), fp32_choice=b.get('fp32_choice')) for b in info['budgets']]
        return PipelineResult(self.out, budgets, info['predictor'], info['latency'], info['data'], info['train'],
                              self.out / 'report.md', self.out / 'pareto.png')


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
