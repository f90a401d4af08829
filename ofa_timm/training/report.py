"""Run reports: the per-stage summary table and the validation-accuracy plot, from metrics.jsonl."""
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    from ..space import SearchSpace, Subnet

__all__ = ['read_metrics', 'summary_table', 'write_run_report', 'plot_validation', 'validation_figure',
           'source_check_lines', 'source_check_subnets']


def read_metrics(path: Union[str, Path]) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summary_table(summaries: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table: one row per stage, with its last validation (epochs and optimizer steps done by then)."""
    rows = ['| stage | epochs | steps | mean top-1 | min top-1 | max top-1 | mean top-5 | time (s) |',
            '|---|---:|---:|---:|---:|---:|---:|---:|']
    for s in summaries:
        rows.append(f"| {s['stage']} | {s['epoch']} | {s.get('step', '')} | {s['top1']:.2f} | {s['min_top1']:.2f} | "
                    f"{s['max_top1']:.2f} | {s['top5']:.2f} | {s['seconds']:.0f} |")
    return '\n'.join(rows)


def write_run_report(summaries: Sequence[Dict[str, Any]], output: Union[str, Path]) -> str:
    """Write a run's ``summary.md`` (the per-stage table) and, from its ``metrics.jsonl``, ``val_accuracy.png`` into
    ``output``; returns the table."""
    output = Path(output)
    table = summary_table(summaries)
    (output / 'summary.md').write_text(table + '\n')
    metrics = output / 'metrics.jsonl'
    if metrics.is_file():
        plot_validation(read_metrics(metrics), output / 'val_accuracy.png')
    return table


def _listed(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return ' and '.join([', '.join(items[:-1]), items[-1]]) if len(items) > 1 else items[0]


def source_check_subnets(space: 'SearchSpace') -> List['Subnet']:
    """What a source check measures: the max subnet at each of the space's resolutions up to five, else at the ends
    and three between them (OFA's space has 25); at its own resolution in a space without resolutions."""
    resolutions = list(space.resolutions)
    if len(resolutions) > 5:
        resolutions = [resolutions[round(i * (len(resolutions) - 1) / 4)] for i in range(5)]
    return [space.max().replace(resolution=r) for r in resolutions] or [space.max()]


def source_check_lines(top1: Mapping[Optional[int], float], num_classes: int, gap: float = 10.) -> List[str]:
    """What a pretrained start's source check says: the source's validation top-1 at each checked resolution, and a
    warning naming the resolutions where it is more than ``gap`` points below its top-1 at the largest (unless it is
    near chance there, as with a new classifier, where there is nothing to keep yet)."""
    def px(res: Optional[int]) -> str:
        return f'{res} px' if res is not None else 'its own resolution'
    largest = list(top1)[-1]
    best = top1[largest]
    lines = ['Source (the max subnet before training), validation top-1: ' + ', '.join(
        f'{acc:.1f}% at {px(res)}' for res, acc in top1.items())]
    chance = 100. / num_classes
    if best < min(2 * chance, chance + 20):
        lines.append(f'  The source is near chance on these classes (chance is {chance:.1f}%), as with a new '
                     f'classifier: there is no accuracy to keep yet')
        return lines
    far = [res for res, acc in top1.items() if acc < best - gap]
    if far:
        known = [res for res, acc in top1.items() if acc >= best - gap]
        lines.append(
            f"  Warning: at {_listed([px(r) for r in far])} the source is more than {gap:g} points below its "
            f"{best:.1f}% at {px(largest)}. Shrinking will have to learn {'it' if len(far) == 1 else 'them'} too, in "
            f"weights the max subnet shares, so the max subnet may end below the source. To keep the source, train "
            f"only resolutions it knows (of those checked: --resolutions {' '.join(map(str, known))}), or give "
            f"shrinking more steps (--min-steps; on 497 digits a MobileNetV3 needed 4,000, the recipe's floor); "
            f"docs/results.md#budget-or-method has the figures.")
    return lines


def _corner_name(label: str, dims: Sequence[str]) -> str:
    """'k=min,d=max@32' -> 'k=min d=max e=max @ 32 px' over every dimension of the run ('max'/'min' when uniform)."""
    corner, _, res = label.partition('@')
    picks = dict(p.split('=') for p in corner.split(',') if '=' in p)
    values = [picks.get(d, 'max') for d in dims]  # a dimension a stage does not unlock stays at its max
    name = values[0] if values and len(set(values)) == 1 else ' '.join(f'{d}={v}' for d, v in zip(dims, values))
    return f'{name or "max"} @ {res} px' if res else name or 'max'


def plot_validation(metrics: Sequence[Dict[str, Any]], path: Union[str, Path]) -> Path:
    """Write :func:`validation_figure` to a PNG."""
    fig = validation_figure(metrics)
    import matplotlib.pyplot as plt
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def validation_figure(metrics: Sequence[Dict[str, Any]]) -> Any:
    """A matplotlib figure of the top-1 of each validated subnet across stages, and of their mean in bold.

    Each thin line is one subnet, named by its corner (``k=min`` ...: each unlocked dimension at its min or max, the
    legend's title says which letter stands for which) and resolution, and followed across stages: a dimension a
    stage does not unlock is at its max, so the max subnet is one line from the full stage on. Solid lines are at the
    largest validated resolution, dashed at the others.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    vals = [m for m in metrics if m.get('type') == 'val']
    dims: List[str] = []
    for m in vals:
        for part in m['subnet'].partition('@')[0].split(','):
            if '=' in part and part.split('=')[0] not in dims:
                dims.append(part.split('=')[0])
    points: Dict[str, List[Tuple[int, float]]] = {}
    resolution: Dict[str, int] = {}
    stage_starts: Dict[str, int] = {}
    for m in vals:
        name = _corner_name(m['subnet'], dims)
        points.setdefault(name, []).append((m['global_step'], m['top1']))
        resolution[name] = int(m['subnet'].partition('@')[2] or 0)
        stage_starts.setdefault(m['stage'], m['global_step'])
    # Stages start where the previous one ended: take the first step of each stage from the training records.
    for m in metrics:
        if m.get('type') == 'train' and m['stage'] in stage_starts:
            stage_starts[m['stage']] = min(stage_starts[m['stage']], m['global_step'] - m['step'])
    top = max(resolution.values(), default=0)
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colours = plt.get_cmap('tab10' if len(points) <= 10 else 'tab20')
    order = sorted(points, key=lambda n: (not n.startswith('max'), not n.startswith('min'), n))
    for i, name in enumerate(order):
        xs, ys = zip(*points[name])
        ax.plot(xs, ys, marker='o', markersize=3, linewidth=1, color=colours(i % colours.N),
                linestyle='-' if resolution[name] == top else '--', label=name)
    means = [(m['global_step'], m['top1']) for m in metrics if m.get('type') == 'val_mean']
    if means:
        xs, ys = zip(*means)
        ax.plot(xs, ys, color='black', linewidth=3, marker='o', markersize=5, label='mean of the validated subnets',
                zorder=5)
    # Each stage is a band (alternately shaded) named in its middle: its validations sit at its right edge.
    starts = sorted(stage_starts.items(), key=lambda kv: kv[1])
    last = max((m['global_step'] for m in metrics if 'global_step' in m), default=0)
    for i, (stage, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else last
        if i % 2:
            ax.axvspan(start, end, color='grey', alpha=0.08, linewidth=0)
        ax.axvline(start, color='grey', linewidth=0.5, linestyle=':')
        ax.annotate(stage, ((start + end) / 2, 0.02), xycoords=('data', 'axes fraction'), rotation=90, fontsize=8,
                    ha='center', va='bottom', color='dimgrey')
    tops = [y for xy in points.values() for _, y in xy]
    if tops:  # at least 10 points of range, so that a 1-point wobble does not look like a collapse
        lo, hi = min(tops), max(tops)
        ax.set_ylim(max(0., min(lo, hi - 10) - 1), min(100., hi + 1))
    ax.set_xlabel('optimizer step')
    ax.set_ylabel('top-1 (%)')
    ax.set_title('Validation top-1 of BN-recalibrated subnets across progressive-shrinking stages')
    names = {k: v for m in metrics if m.get('type') == 'val_mean' for k, v in m.get('names', {}).items()}
    title = f"subnet ({'/'.join(dims)}: {'/'.join(names.get(d, d) for d in dims)})" if dims else 'subnet'
    ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5), title=title, title_fontsize=7)
    fig.tight_layout()
    return fig
