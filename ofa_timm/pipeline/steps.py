"""The work of the pipeline's steps, as plain functions of what each step reads; ``Pipeline`` runs them in order,
records their inputs, and skips or continues them (``core.py``)."""
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .._dist import barrier as _barrier
from .._io import save_supernet, write_text_atomic
from ..search.budget import Budget
from ..space import SearchSpace, Subnet
from .config import LOCAL_BACKENDS, RunConfig
from .data import Splits

__all__ = ['train_supernet', 'latency_table', 'search_candidates', 'pick_winners', 'report_on_test_split']

Log = Callable[[str], None]


def train_supernet(cfg: RunConfig, splits: Splits, schedule: Any, pretrained: bool, run_dir: Path,
                   supernet_path: Path, resumable: bool, is_main: bool, log: Log) -> Dict[str, Any]:
    """Progressive shrinking of ``cfg.model`` on the training split (continuing the checkpoint in ``run_dir`` if the
    step is resumable); the trained weights go to ``supernet_path``. Returns the training summary."""
    from dataclasses import replace
    from ..search.export import load_supernet
    from ..training import Trainer
    from ..training.report import write_run_report
    if not resumable and is_main and run_dir.exists():
        shutil.rmtree(run_dir)  # another run's checkpoint: its inputs changed
    _barrier()
    torch.manual_seed(cfg.seed)
    supernet = load_supernet(cfg.model, num_classes=splits.num_classes, resolutions=cfg.resolutions,
                             pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file,
                             model_kwargs=cfg.model_kwargs)
    train_cfg = replace(cfg.train, output=str(run_dir), seed=cfg.seed, progress=cfg.progress)
    trainer = Trainer(supernet, schedule, splits.train, splits.val, splits.calib, train_cfg, pretrained=pretrained)
    if (run_dir / 'last.pth').is_file():
        trainer.resume()
        log(f'      resuming at {trainer.where()}')
    log('      ' + trainer.describe_schedule().replace('\n', '\n      '))
    trainer.run()
    summaries = trainer.summaries()
    if is_main:
        save_supernet(trainer.supernet, supernet_path)
        write_run_report(summaries, run_dir)
    return dict(steps=trainer.position.global_step, stages=[
        dict(stage=s['stage'], top1=s['top1'], min_top1=s['min_top1'], max_top1=s['max_top1']) for s in summaries])


def latency_table(spec: str, supernet: torch.nn.Module, path: Path, cfg: RunConfig, resumable: bool) -> Any:
    """The latency table ``spec`` names (a backend measured here, ``kit:RESULTS.json`` or a table file), written to
    ``path``."""
    from ..search.latency import LatencySettings, LatencyTable, build_latency_table
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resumable:
        path.unlink(missing_ok=True)
    if spec in LOCAL_BACKENDS:
        settings = LatencySettings(spec, cfg.latency_batch_size, cfg.latency_threads)
        table = build_latency_table(supernet, path, settings, calibrate=cfg.calibrate, seed=cfg.seed,
                                    model=cfg.model, progress=cfg.progress, validate=cfg.validate)
    elif spec.startswith('kit:'):
        from ..search.kit import import_kit_results
        table = import_kit_results(spec[4:])
        if table.space != supernet.space:
            raise ValueError(f'The kit {spec[4:]} was made for another space than {cfg.model} has')
    else:
        table = LatencyTable.load(spec, space=supernet.space)
    table.save(path)
    return table


def search_candidates(supernet: torch.nn.Module, predictor: Any, models: Mapping[str, Any], budgets: Sequence[Budget],
                      finalists: int, seed: int) -> List[Dict[str, Any]]:
    """Per budget: its absolute limits and its best ``finalists`` distinct candidates of a constrained evolution (by
    predicted top-1), each with its costs."""
    from ..search import EvolutionConfig, specialize
    limits = [b.resolve(models) for b in budgets]
    results = specialize(supernet, predictor, models, limits, EvolutionConfig(), seed=seed)
    space = supernet.space
    out = []
    for budget, limit, r in zip(budgets, limits, results):
        seen, candidates = set(), []
        for i in np.argsort(-r.population_accuracy, kind='stable'):
            code = tuple(r.population[i])
            if code in seen or any(r.population_costs[k][i] > v for k, v in limit.items()):
                continue
            seen.add(code)
            candidates.append(dict(subnet=space.decode(r.population[i]).to_dict(),
                                   predicted=float(r.population_accuracy[i]),
                                   costs={k: float(v[i]) for k, v in r.population_costs.items()}))
            if len(candidates) == finalists:
                break
        out.append(dict(label=budget.label, limits=limit, candidates=candidates))
    return out


def pick_winners(search: List[Dict[str, Any]], measured: Mapping[Subnet, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Each budget's candidates with their measured validation top-1; the best measured one wins (ties go to the
    higher prediction), so that a predictor's ranking error cannot pick a bad subnet."""
    out = []
    for b in search:
        for c in b['candidates']:
            c['val_top1'] = measured[Subnet.from_dict(c['subnet'])]['top1']
        winner = max(b['candidates'], key=lambda c: (c['val_top1'], c['predicted']))
        out.append(dict(b, winner=winner))
    return out


def report_on_test_split(cfg: RunConfig, supernet: torch.nn.Module, out: Path, finalists: List[Dict[str, Any]],
                models: Mapping[str, Any], predictor: Any, test: Callable[[Subnet], Dict[str, float]],
                random_rows: Tuple[np.ndarray, np.ndarray], info: Dict[str, Any],
                load_line: Callable[[Path], str]) -> Tuple[Dict[str, Any], List[Path]]:
    """Each winner's top-1 on the test split, its costs, its latency measured here (where the table is local) and
    the best random subnet within its budget; ``results.json``, ``pareto.png`` and ``report.md``.

    Args:
        cfg: The run's settings.
        supernet: The trained supernet.
        out: The work folder.
        finalists: The finalists step's output.
        models: Cost models by name.
        predictor: The accuracy predictor (for the plot).
        test: Top-1 and top-5 of a subnet on the test split.
        random_rows: Codes and validation top-1 of the randomly evaluated subnets.
        info: What the report says of the run besides the budgets (model, data, training, predictor, latency).
        load_line: The Python that loads an exported subnet.
    """
    from ..search.latency import measure_subnets
    from .report import plot_report, report_markdown
    space = supernet.space
    codes, val_top1 = random_rows
    random_costs = {k: np.asarray(m(codes), dtype=np.float64) for k, m in models.items()}
    table = models.get('latency')
    local = table is not None and not table.meta.get('kit') and table.meta.get('backend') in LOCAL_BACKENDS \
        and (table.meta.get('backend') != 'torch-cuda' or torch.cuda.is_available())
    winners = [Subnet.from_dict(b['winner']['subnet']) for b in finalists]
    measured = measure_subnets(supernet, winners, table.settings, progress=cfg.progress) if local \
        else [None] * len(winners)
    budgets = []
    for b, subnet, latency in zip(finalists, winners, measured):
        metrics = test(subnet)
        code = space.encode(subnet)
        export = out / 'export' / b['label']
        budgets.append(dict(
            label=b['label'], limits=b['limits'], subnet=subnet.to_dict(), predicted_top1=b['winner']['predicted'],
            val_top1=b['winner']['val_top1'], test_top1=metrics['top1'], test_top5=metrics['top5'],
            costs={k: float(m(code)[0]) for k, m in models.items()},
            latency_measured=None if latency is None else float(latency),
            random_best=_random_best(space, codes, val_top1, random_costs, b['limits'], test),
            files=sorted(str(p) for p in export.iterdir()) if export.is_dir() else [], load=load_line(export)))
    info = dict(info, budgets=budgets, latency_measured_here=bool(local))
    results = out / 'results.json'
    write_text_atomic(results, json.dumps(info, indent=1) + '\n')
    plot = plot_report(info, models, predictor, out / 'pareto.png', seed=cfg.seed)
    report = write_text_atomic(out / 'report.md', report_markdown(info, plot.name))
    return dict(budgets=[dict(label=b['label'], test_top1=b['test_top1']) for b in budgets]), [results, plot, report]


def _random_best(space: SearchSpace, codes: np.ndarray, val_top1: np.ndarray, costs: Mapping[str, np.ndarray],
                 limits: Mapping[str, float], test: Callable[[Subnet], Dict[str, float]]) -> Optional[Dict[str, Any]]:
    """The randomly evaluated subnet with the best validation top-1 among those within ``limits`` (what the search
    adds is the difference), with its test top-1; None if none is within them."""
    ok = np.ones(len(codes), dtype=bool)
    for k, v in limits.items():
        ok &= costs[k] <= v
    if not ok.any():
        return None
    i = int(np.flatnonzero(ok)[np.argmax(val_top1[ok])])
    subnet = space.decode(codes[i])
    return dict(subnet=subnet.to_dict(), val_top1=float(val_top1[i]), test_top1=test(subnet)['top1'])
