"""Constrained evolutionary search over a trained supernet, vectorised: whole populations are arrays of codes.

Each generation scores all its children in one predictor call and prices them with the vectorised cost models
(FLOPs, parameters, latency tables), so OFA's default search (population 100, 500 generations) takes well under a
second on a laptop CPU. A budget below the smallest achievable cost fails at once, naming that cost.

    results = specialize(supernet, predictor, 'flops', budgets=[150e6, 300e6])
    results = specialize(supernet.space, predictor, {'latency': table, 'params': params_model(supernet)},
                         budgets=[{'latency': 20, 'params': 5e6}])
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn

from ..space import SearchSpace, Subnet
from .cost import flops_model, format_cost, params_model

__all__ = ['EvolutionConfig', 'SearchResult', 'evolve', 'specialize', 'resolve_constraints']

CostModel = Any  # a callable codes -> (N,) costs with .name, .unit, .space and .minimum()
ConstraintsLike = Union[str, CostModel, Mapping[str, Union[str, CostModel]], Sequence[Union[str, CostModel]]]
BudgetLike = Union[float, Mapping[str, float]]


@dataclass
class EvolutionConfig:
    """Regularised evolution as OFA runs it (its defaults).

    Args:
        population_size: Subnets per generation.
        generations: Number of generations.
        parent_ratio: Share of the population kept as parents.
        mutation_ratio: Share of the children made by mutation (the rest by crossover).
        mutate_prob: Probability that a mutation redraws each gene group (a block's kernel and expand together, a
            stage's depth, a width, the resolution; ``SearchSpace.gene_groups``).
        resample_rounds: Times an infeasible child is redrawn before its parent takes its place (so the search
            never loops forever on a tight budget).
    """
    population_size: int = 100
    generations: int = 500
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    resample_rounds: int = 10

    def __post_init__(self) -> None:
        if self.population_size < 2 or self.generations < 0:
            raise ValueError(f'population_size must be >= 2 and generations >= 0, got {self.population_size}, '
                             f'{self.generations}')
        for name in ('parent_ratio', 'mutation_ratio', 'mutate_prob'):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f'{name} must be in [0, 1], got {getattr(self, name)}')


@dataclass
class SearchResult:
    """The best subnet found under one set of budgets, and the final population (for Pareto plots).

    Args:
        subnet: The best subnet.
        accuracy: Its predicted top-1 (%).
        costs: Its cost under each constraint.
        budgets: The budgets it meets.
        population: Codes of the final population, ``(P, G)``.
        population_accuracy: Their predicted top-1.
        population_costs: Their costs under each constraint.
        history: Best predicted top-1 after each generation.
    """
    subnet: Subnet
    accuracy: float
    costs: Dict[str, float]
    budgets: Dict[str, float]
    population: np.ndarray = field(repr=False)
    population_accuracy: np.ndarray = field(repr=False)
    population_costs: Dict[str, np.ndarray] = field(repr=False)
    history: np.ndarray = field(repr=False)


def _score_fn(predictor: Any) -> Callable[[np.ndarray], np.ndarray]:
    fn = getattr(predictor, 'predict', None) or predictor
    if not callable(fn):
        raise ValueError(f'predictor must have .predict(codes) or be callable, got {type(predictor).__name__}')
    return lambda codes: np.asarray(fn(codes), dtype=np.float64).reshape(len(codes))


def resolve_constraints(supernet_or_space: Union[nn.Module, SearchSpace],
                        constraints: ConstraintsLike) -> Dict[str, CostModel]:
    """Name -> cost model, from ``'flops'`` / ``'params'`` (built from the supernet), cost models, or a mix.

    Raises:
        ValueError: On an unknown name, a name that needs a supernet when given a space, or a cost model of
            another space.
    """
    space = supernet_or_space if isinstance(supernet_or_space, SearchSpace) else supernet_or_space.space
    if isinstance(constraints, (str, bytes)) or not isinstance(constraints, (Mapping, Sequence)):
        constraints = [constraints]
    items = constraints.items() if isinstance(constraints, Mapping) else [(None, c) for c in constraints]
    out: Dict[str, CostModel] = {}
    for name, model in items:
        if isinstance(model, str):
            builders = {'flops': flops_model, 'params': params_model}
            if model not in builders:
                raise ValueError(f"Unknown constraint {model!r}; give 'flops', 'params' or a cost model (e.g. a "
                                 f'LatencyTable)')
            if isinstance(supernet_or_space, SearchSpace):
                raise ValueError(f"The {model!r} constraint needs the supernet, not only its space")
            model = builders[model](supernet_or_space)
        if not callable(model) or not hasattr(model, 'minimum'):
            raise ValueError(f'A constraint must be a cost model with minimum(), got {type(model).__name__}')
        if getattr(model, 'space', space) != space:
            raise ValueError(f'The {getattr(model, "name", "cost")!r} constraint was made for another space')
        out[name or getattr(model, 'name', f'cost{len(out)}')] = model
    if not out:
        raise ValueError('Give at least one constraint')
    return out


def _budget_dict(budget: BudgetLike, names: Sequence[str]) -> Dict[str, float]:
    if isinstance(budget, Mapping):
        unknown = set(budget) - set(names)
        if unknown:
            raise ValueError(f'Budget for unknown constraint(s) {sorted(unknown)}; constraints: {list(names)}')
        return {k: float(v) for k, v in budget.items()}
    if len(names) != 1:
        raise ValueError(f'With several constraints {list(names)}, give each budget as a dict name -> value')
    return {names[0]: float(budget)}


def _check_reachable(models: Mapping[str, CostModel], budgets: Mapping[str, float]) -> None:
    """Raise a ValueError naming the smallest achievable cost if a budget is below it."""
    for name, limit in budgets.items():
        smallest, subnet = models[name].minimum()
        if limit < smallest:
            unit = getattr(models[name], 'unit', '')
            raise ValueError(
                f'No subnet meets {name} <= {format_cost(limit, name, unit)}: the smallest achievable {name} is '
                f'{format_cost(smallest, name, unit)} ({subnet.to_dict()})')


def evolve(
        space: SearchSpace,
        predictor: Any,
        constraints: Mapping[str, CostModel],
        budgets: Mapping[str, float],
        config: EvolutionConfig = EvolutionConfig(),
        seed: int = 0,
) -> SearchResult:
    """The best subnet (by predicted accuracy) whose costs meet every budget.

    Args:
        space: The search space.
        predictor: ``predictor.predict(codes)`` (or ``predictor(codes)``) -> predicted accuracy per row.
        constraints: Name -> cost model (see :func:`resolve_constraints`).
        budgets: Name -> the largest allowed cost; constraints without a budget are not enforced.
        config: Evolution settings.
        seed: Seed; the search is deterministic for a seed.

    Raises:
        ValueError: At once, if a budget is below the smallest cost the space can reach (the message names it), or
            no subnet meeting every budget together is found.
    """
    score = _score_fn(predictor)
    active = {name: constraints[name] for name in budgets}
    _check_reachable(active, budgets)
    rng = np.random.default_rng(seed)
    counts = space.choice_counts
    n_genes = len(counts)
    pop_size = config.population_size
    n_parents = max(1, int(round(config.parent_ratio * pop_size)))
    n_mutate = int(round(config.mutation_ratio * pop_size))

    def price(codes: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        costs = {name: np.asarray(model(codes), dtype=np.float64) for name, model in constraints.items()}
        # the space's own constraints (a head count that divides the width, ...) hold like any budget
        ok = space.feasible(codes) if space.constraints else np.ones(len(codes), dtype=bool)
        for name, limit in budgets.items():
            ok &= costs[name] <= limit
        return ok, costs

    # Initial population: uniform draws that meet the budgets; under a budget so tight that draws rarely meet it,
    # the cheapest subnet of each constraint fills in (mutation then spreads out from it).
    found, have = [], 0
    for _ in range(config.resample_rounds * 10):
        if have >= pop_size:
            break
        draw = rng.integers(0, counts, size=(4 * pop_size, n_genes))
        ok, _ = price(draw)
        found.append(draw[ok])
        have += int(ok.sum())
    if have < pop_size and active:
        cheapest = np.stack([space.encode(model.minimum()[1]) for model in active.values()])
        found.append(cheapest[price(cheapest)[0]])
    pool = np.concatenate(found) if found else np.zeros((0, n_genes), dtype=np.int64)
    if not len(pool):
        raise ValueError(f'No subnet meeting every budget together ({budgets}) was found; each is reachable alone, '
                         f'so relax one of them')
    population = pool[:pop_size] if len(pool) >= pop_size else pool[rng.integers(len(pool), size=pop_size)]
    _, costs = price(population)
    scores = score(population)
    history = np.empty(config.generations)

    groups = space.gene_groups

    def mutate(parents: np.ndarray) -> np.ndarray:
        # One draw per group: a block's kernel and expand are redrawn together, as in OFA (redrawing each gene on
        # its own changes about 1.5x as many blocks per mutation, and found subnets predicted about a point worse).
        redraw = (rng.random((len(parents), int(groups.max()) + 1)) < config.mutate_prob)[:, groups]
        return np.where(redraw, rng.integers(0, counts, size=parents.shape), parents)

    def cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(rng.random(a.shape) < 0.5, a, b)

    for gen in range(config.generations):
        order = np.argsort(-scores, kind='stable')[:n_parents]
        parents, parent_scores = population[order], scores[order]
        parent_costs = {k: v[order] for k, v in costs.items()}
        history[gen] = parent_scores[0]
        first = parents[rng.integers(n_parents, size=pop_size)]
        second = parents[rng.integers(n_parents, size=pop_size - n_mutate)]
        children = np.concatenate([mutate(first[:n_mutate]), cross(first[n_mutate:], second)])
        ok, child_costs = price(children)
        for _ in range(config.resample_rounds):
            bad = np.nonzero(~ok)[0]
            if not len(bad):
                break
            is_mut = bad < n_mutate
            redo = np.empty((len(bad), n_genes), dtype=np.int64)
            redo[is_mut] = mutate(first[bad[is_mut]])
            redo[~is_mut] = cross(first[bad[~is_mut]], second[bad[~is_mut] - n_mutate])
            redo_ok, redo_costs = price(redo)
            children[bad], ok[bad] = redo, redo_ok
            for k in child_costs:
                child_costs[k][bad] = redo_costs[k]
        bad = np.nonzero(~ok)[0]
        if len(bad):  # still infeasible: the (feasible) first parent takes the place
            children[bad] = first[bad]
            for k in child_costs:
                child_costs[k][bad] = np.asarray(constraints[k](first[bad]), dtype=np.float64)
        population = np.concatenate([parents, children])
        scores = np.concatenate([parent_scores, score(children)])
        costs = {k: np.concatenate([parent_costs[k], child_costs[k]]) for k in costs}
    best = int(np.argmax(scores))
    return SearchResult(
        subnet=space.decode(population[best]), accuracy=float(scores[best]),
        costs={k: float(v[best]) for k, v in costs.items()}, budgets=dict(budgets), population=population,
        population_accuracy=scores, population_costs=costs, history=history)


def specialize(
        supernet_or_space: Union[nn.Module, SearchSpace],
        predictor: Any,
        constraints: ConstraintsLike,
        budgets: Sequence[BudgetLike],
        config: EvolutionConfig = EvolutionConfig(),
        seed: int = 0,
        progress: bool = False,
) -> List[SearchResult]:
    """The best subnet for each budget: one constrained evolutionary search per budget.

    Args:
        supernet_or_space: A supernet (needed for ``'flops'`` / ``'params'`` constraints) or its space.
        predictor: An :class:`~ofa_timm.search.AccuracyPredictor` (or any callable codes -> accuracy).
        constraints: ``'flops'``, ``'params'``, a cost model (``LatencyTable``, ``AdditiveCost``), or a dict / list
            of them.
        budgets: One per search: a number for a single constraint, else a dict name -> budget.
        config: Evolution settings (OFA's defaults).
        seed: Seed of every search.
        progress: Show a progress bar over the budgets (when the output is a terminal).

    Returns:
        One :class:`SearchResult` per budget, in order.

    Raises:
        ValueError: On a predictor or constraint made for another space, and at once on a budget no subnet meets.
    """
    from tqdm import tqdm
    space = supernet_or_space if isinstance(supernet_or_space, SearchSpace) else supernet_or_space.space
    if getattr(predictor, 'space', space) != space:
        raise ValueError('The predictor was made for another space than the supernet\'s')
    models = resolve_constraints(supernet_or_space, constraints)
    budget_dicts = [_budget_dict(b, list(models)) for b in budgets]
    if not budget_dicts:
        raise ValueError('Give at least one budget')
    for b in budget_dicts:  # fail on any unreachable budget before searching any
        _check_reachable(models, b)
    return [evolve(space, predictor, models, b, config, seed)
            for b in tqdm(budget_dicts, desc='searching', disable=None if progress else True, unit='budget')]
