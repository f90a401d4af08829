"""Search reports: the Pareto plot (predicted accuracy against cost) and a Markdown table of the chosen subnets."""
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .._io import atomic_path, write_text_atomic
from .cost import format_cost
from .evolution import SearchResult

__all__ = ['plot_pareto', 'results_table', 'pareto_front']


def pareto_front(costs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both lower cost and higher score, by increasing cost."""
    order = np.lexsort((-scores, costs))
    front, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return np.array(front, dtype=np.int64)


def plot_pareto(
        results: Sequence[SearchResult],
        cost: str,
        path: Union[str, Path],
        unit: str = '',
        background: Optional[Tuple[np.ndarray, np.ndarray]] = None,
        title: str = '',
) -> Path:
    """Predicted accuracy against ``cost``: every search's final population shaded, the chosen subnets marked,
    each budget drawn as a dashed line, and the front through the populations.

    Args:
        results: One search result per budget.
        cost: Constraint name on the x axis.
        path: PNG file to write.
        unit: Unit of the cost (``'ms'``); FLOPs and parameters are shown in millions.
        background: ``(costs, accuracies)`` of random subnets, drawn in grey for context.
        title: Figure title.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    div, label = (1.0, f'{cost} ({unit})') if unit else (1e6, f'{cost} (M)')
    fig, ax = plt.subplots(figsize=(8, 5))
    if background is not None:
        ax.scatter(background[0] / div, background[1], s=6, color='0.75', alpha=0.5, linewidths=0,
                   label='random subnets')
    all_costs = np.concatenate([r.population_costs[cost] for r in results])
    all_scores = np.concatenate([r.population_accuracy for r in results])
    ax.scatter(all_costs / div, all_scores, s=8, color='tab:blue', alpha=0.15, linewidths=0,
               label='search populations')
    front = pareto_front(all_costs, all_scores)
    ax.plot(all_costs[front] / div, all_scores[front], color='tab:blue', linewidth=1, label='front')
    for i, r in enumerate(results):
        color = plt.cm.viridis(i / max(1, len(results) - 1))
        ax.axvline(r.budgets[cost] / div, color=color, linestyle='--', linewidth=0.8)
        ax.scatter([r.costs[cost] / div], [r.accuracy], marker='*', s=180, color=color, edgecolors='black',
                   zorder=5, label=f'best under {format_cost(r.budgets[cost], cost, unit)}')
    ax.set_xlabel(label)
    ax.set_ylabel('predicted top-1 (%)')
    ax.set_title(title or f'Best subnet per {cost} budget')
    ax.legend(fontsize=7, loc='lower right')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format='png')
    plt.close(fig)
    return path


def results_table(results: Sequence[SearchResult], units: Optional[dict] = None, header: str = '') -> str:
    """Markdown: one row per budget with the chosen subnet's predicted accuracy, costs and architecture."""
    units = units or {}
    names = list(results[0].costs) if results else []
    lines = [header] if header else []
    lines.append('| budget | predicted top-1 (%) | ' + ' | '.join(names) + ' | resolution | depths | subnet |')
    lines.append('|---|---:|' + '---:|' * len(names) + '---:|---|---|')
    for r in results:
        budget = ', '.join(f'{k} <= {format_cost(v, k, units.get(k, ""))}' for k, v in r.budgets.items())
        costs = ' | '.join(format_cost(r.costs[k], k, units.get(k, '')) for k in names)
        lines.append(f'| {budget} | {r.accuracy:.2f} | {costs} | {r.subnet.resolution} | {list(r.subnet.depths)} | '
                     f'`{r.subnet.to_dict()}` |')
    return '\n'.join(lines) + '\n'


def write_results(results: Sequence[SearchResult], path: Union[str, Path], **kwargs) -> Path:
    """Write :func:`results_table` to a file, atomically."""
    return write_text_atomic(path, results_table(results, **kwargs))
