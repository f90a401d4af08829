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

__all__ = ['train_supernet', 'latency_table', 'search_candidates', 'time_candidates', 'pick_winners',
           'report_on_test_split']

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
    source = trainer.source_check
    return dict(steps=trainer.position.global_step, stages=[
        dict(stage=s['stage'], top1=s['top1'], min_top1=s['min_top1'], max_top1=s['max_top1']) for s in summaries],
        source=source['top1'] if source else None)


def latency_table(spec: str, supernet: torch.nn.Module, path: Path, cfg: RunConfig, resumable: bool) -> Any:
    """The latency table ``spec`` names (a backend measured here, ``kit:RESULTS.json`` or a table file), written to
    ``path``."""
    from ..search.latency import LatencySettings, LatencyTable, build_latency_table
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resumable:
        path.unlink(missing_ok=True)
    if spec in LOCAL_BACKENDS:
        settings = LatencySettings(spec, cfg.latency_batch_size, cfg.latency_threads, precision=cfg.precision)
        table = build_latency_table(supernet, path, settings, calibrate=cfg.calibrate, seed=cfg.seed,
                                    model=cfg.model, progress=cfg.progress, validate=cfg.validate)
    elif spec.startswith('kit:'):
        from ..search.kit import import_kit_results
        table = import_kit_results(spec[4:]).check_precision(cfg.precision, f'The kit {spec[4:]}')
        if table.space != supernet.space:
            raise ValueError(f'The kit {spec[4:]} was made for another space than {cfg.model} has')
    else:
        table = LatencyTable.load(spec, space=supernet.space).check_precision(cfg.precision, f'The table {spec}')
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


def _timed(m: Any, i: int) -> Dict[str, float]:
    """Row ``i`` of an :class:`~ofa_timm.search.latency.AnchoredLatency`, in ms."""
    return dict(table_ms=float(m.table_ms[i]), low_ms=float(m.low_ms[i]), high_ms=float(m.high_ms[i]),
                measured_ms=float(m.measured_ms[i]), drift=m.drift)


def time_candidates(search: List[Dict[str, Any]], table: Any, supernet: torch.nn.Module,
                    progress: bool) -> Optional[Dict[Subnet, Dict[str, float]]]:
    """The candidates of latency budgets, timed here against the table's anchors (``measure_anchored``): their
    drift-corrected latency and its 95 % interval, by subnet; None without a table this machine can time."""
    if table is None:
        return None
    from ..search.latency import measure_anchored
    subnets = list(dict.fromkeys(Subnet.from_dict(c['subnet']) for b in search if 'latency' in b['limits']
                                 for c in b['candidates']))
    if not subnets:
        return None
    m = measure_anchored(table, supernet, subnets, progress=progress, desc='finalists (latency)')
    return {s: _timed(m, i) for i, s in enumerate(subnets)}


def pick_winners(search: List[Dict[str, Any]], measured: Mapping[Subnet, Mapping[str, Any]],
                 measured_int8: Optional[Mapping[Subnet, Mapping[str, Any]]] = None,
                 latency: Optional[Mapping[Subnet, Mapping[str, float]]] = None) -> List[Dict[str, Any]]:
    """Each budget's candidates with their measured validation top-1; the best measured one wins (ties go to the
    higher prediction), so that a predictor's ranking error cannot pick a bad subnet.

    With ``latency`` (candidates of latency budgets timed here), a candidate whose timed latency exceeds the budget is
    dropped before the choice: a budget holds against measurement, not only against the table's prediction. If every
    candidate exceeds it, the fastest one is kept, and the report flags it.

    With ``measured_int8`` (an int8 run), each candidate also gets ``val_top1_int8``, the winner is the best in INT8,
    and ``fp32_choice`` is the candidate the FP32 top-1 would have picked (the same one, or what INT8 changed).
    """
    out = []
    for b in search:
        limit = b['limits'].get('latency')
        for c in b['candidates']:
            subnet = Subnet.from_dict(c['subnet'])
            c['val_top1'] = measured[subnet]['top1']
            if measured_int8 is not None:
                c['val_top1_int8'] = measured_int8[subnet]['top1']
            if latency is not None and subnet in latency:
                c['latency_timed'] = dict(latency[subnet])
        eligible = b['candidates']
        if limit is not None and latency is not None:
            eligible = [c for c in eligible if c['latency_timed']['table_ms'] <= limit] or \
                [min(eligible, key=lambda c: c['latency_timed']['table_ms'])]
        chosen = dict(b, dropped_over_budget=len(b['candidates']) - len(eligible)) if limit is not None and \
            latency is not None else dict(b)
        fp32 = max(eligible, key=lambda c: (c['val_top1'], c['predicted']))
        if measured_int8 is None:
            out.append(dict(chosen, winner=fp32))
        else:
            winner = max(eligible, key=lambda c: (c['val_top1_int8'], c['val_top1'], c['predicted']))
            out.append(dict(chosen, winner=winner, fp32_choice=fp32))
    return out


def report_on_test_split(cfg: RunConfig, supernet: torch.nn.Module, out: Path, finalists: List[Dict[str, Any]],
                models: Mapping[str, Any], predictor: Any, test: Callable[[Subnet], Dict[str, float]],
                random_rows: Tuple[np.ndarray, np.ndarray], info: Dict[str, Any],
                load_line: Callable[[Path], str], table: Any = None,
                test_int8: Optional[Callable[[Subnet], Dict[str, float]]] = None) -> Tuple[Dict[str, Any], List[Path]]:
    """Each winner's top-1 on the test split, its costs, its latency timed here against the table's anchors (where
    the table is local; flagged when over its budget) and the best random subnet within its budget; in an int8 run,
    its INT8 test top-1 too, and the FP32 choice's where INT8 chose another; ``results.json``, ``pareto.png`` and
    ``report.md``.

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
        table: The latency table, where this machine can time its subnets (else None).
        test_int8: Top-1 of a subnet's INT8 graph on the test split (an int8 run).
    """
    from ..search.latency import measure_anchored
    from .report import plot_report, report_markdown
    space = supernet.space
    codes, val_top1 = random_rows
    random_costs = {k: np.asarray(m(codes), dtype=np.float64) for k, m in models.items()}
    winners = [Subnet.from_dict(b['winner']['subnet']) for b in finalists]
    local = table is not None
    unique = list(dict.fromkeys(winners))  # budgets may share a winner: time it once
    timed = measure_anchored(table, supernet, unique, progress=cfg.progress, desc='winners (latency)') if local \
        else None
    budgets = []
    for b, subnet in zip(finalists, winners):
        metrics = test(subnet)
        code = space.encode(subnet)
        export = out / 'export' / b['label']
        latency = _timed(timed, unique.index(subnet)) if timed is not None else None
        limit = b['limits'].get('latency')
        if latency is not None and limit is not None:
            latency['over_budget_pct'] = max(0.0, 100 * (latency['table_ms'] / limit - 1))
        row = dict(
            label=b['label'], limits=b['limits'], subnet=subnet.to_dict(), predicted_top1=b['winner']['predicted'],
            val_top1=b['winner']['val_top1'], test_top1=metrics['top1'], test_top5=metrics['top5'],
            costs={k: float(m(code)[0]) for k, m in models.items()},
            latency_measured=None if latency is None else latency['measured_ms'], latency=latency,
            random_best=_random_best(space, codes, val_top1, random_costs, b['limits'], test),
            files=sorted(str(p) for p in export.iterdir()) if export.is_dir() else [], load=load_line(export))
        if test_int8 is not None:
            row.update(val_top1_int8=b['winner']['val_top1_int8'], test_top1_int8=test_int8(subnet)['top1'])
            fp32 = Subnet.from_dict(b['fp32_choice']['subnet'])
            row['fp32_choice'] = None if fp32 == subnet else dict(
                subnet=fp32.to_dict(), val_top1=b['fp32_choice']['val_top1'],
                val_top1_int8=b['fp32_choice']['val_top1_int8'], test_top1=test(fp32)['top1'],
                test_top1_int8=test_int8(fp32)['top1'])
        budgets.append(row)
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
