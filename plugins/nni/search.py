"""NNI multi-trial search over a trained supernet: a BN-recalibrating evaluator, cost constraints, JSON results.

    space = SupernetSpace(trained_supernet, cost=flops_cost(trained_supernet), max_cost=300e6)
    evaluator = subnet_evaluator(calib_loader, val_loader)
    exp = run_experiment(NasExperiment(space, evaluator, RegularizedEvolution(...), search_config(max_trials=50)), root)
    save_top_subnets(exp, space, 'results/', top_k=3)   # JSON files for timm.create_model(..., subnet=path)
"""
import os
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Union

import torch
import torch.nn as nn

from ._shims import quiet_nni_import

with quiet_nni_import():
    import nni
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.experiment import NasExperimentConfig

from ofa_timm.search.cost import flops_model
from ofa_timm.space import Subnet
from ofa_timm.training.evaluate import evaluate_subnet

from .space import SharedSubnet, SupernetSpace

# The score an infeasible subnet reports: below every accuracy, and skipped by save_top_subnets.
INFEASIBLE = -1.0

__all__ = ['INFEASIBLE', 'flops_cost', 'subnet_evaluator', 'evaluate_shared_subnet', 'search_config',
           'save_top_subnets']


def flops_cost(supernet: nn.Module, cache_size: int = 4096) -> Callable[[Subnet], float]:
    """FLOPs of a subnet of ``supernet`` at its resolution, from the analytic cost model (no model is built).

    Equal to ``count_flops`` on the extracted model. ``cache_size`` is kept for compatibility; the lookup needs no
    cache.
    """
    model = flops_model(supernet)

    def cost(subnet: Subnet) -> float:
        return float(model(subnet)[0])
    return cost


def evaluate_shared_subnet(
        model: SharedSubnet, calib_loader: Iterable, val_loader: Iterable, calib_images: int = 500,
        device: Union[str, torch.device] = 'cpu', cost: Optional[Callable[[Subnet], float]] = None,
        max_cost: Optional[float] = None,
) -> float:
    """BN-recalibrate the subnet (extracted: the supernet is untouched), measure top-1 and report it to NNI.

    With ``cost`` and ``max_cost``, an infeasible subnet is skipped: it reports :data:`INFEASIBLE` (below any
    accuracy) without being evaluated. Use this with strategies that cannot handle constraints in the space (TPE);
    evolution and random search use the space's :class:`CostConstraint` and never sample infeasible subnets.
    """
    subnet = model.subnet
    if cost is not None and max_cost is not None and cost(subnet) > max_cost:
        nni.report_final_result(INFEASIBLE)
        return INFEASIBLE
    top1 = evaluate_subnet(model.supernet, subnet, calib_loader, val_loader, calib_images, device)['top1']
    nni.report_final_result(top1)
    return top1


def subnet_evaluator(
        calib_loader: Iterable, val_loader: Iterable, calib_images: int = 500, device: Union[str, torch.device] = 'cpu',
        cost: Optional[Callable[[Subnet], float]] = None, max_cost: Optional[float] = None,
) -> FunctionalEvaluator:
    """An NNI evaluator that scores each sampled subnet by its BN-recalibrated top-1 (no Lightning trainer).

    See :func:`evaluate_shared_subnet` for ``cost`` / ``max_cost``.
    """
    return FunctionalEvaluator(evaluate_shared_subnet, calib_loader=calib_loader, val_loader=val_loader,
                               calib_images=calib_images, device=str(device), cost=cost, max_cost=max_cost)


def search_config(max_trials: int) -> NasExperimentConfig:
    """In-process, weight-sharing multi-trial config: the sequential engine and 'raw' models, so that every trial
    gets a :class:`SharedSubnet` of the same supernet object (NNI's default would start its manager on port 8080 and
    rebuild the space instead). Run it with :func:`run_experiment` to keep NNI's files out of ``$HOME``."""
    config = NasExperimentConfig('sequential', 'raw')
    config.max_trial_number = max_trials
    config.trial_concurrency = 1
    return config


def save_top_subnets(exp: Any, space: SupernetSpace, folder: Union[str, os.PathLike], top_k: int = 1) -> List[Path]:
    """Write the experiment's best feasible subnets as JSON files that ``timm.create_model(..., subnet=path)`` reads.

    Raises:
        ValueError: If the experiment evaluated no feasible subnet.
    """
    folder = Path(folder)
    ranked = [m for m in exp.strategy.list_models(sort=True, limit=None)
              if m.metric is not None and float(m.metric) > INFEASIBLE]
    if not ranked:
        raise ValueError('The experiment evaluated no feasible subnet; raise the budget or the number of trials')
    paths = []
    for i, model in enumerate(ranked[:top_k]):
        path = folder / f'subnet_top{i + 1}.json'
        space.to_subnet({k: v for k, v in model.sample.items() if k in space.labels}).to_json(path)
        paths.append(path)
    return paths
