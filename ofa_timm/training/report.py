"""Run reports: the per-stage summary table and the validation-accuracy plot, from metrics.jsonl."""
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

__all__ = ['read_metrics', 'summary_table', 'plot_validation']


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


def plot_validation(metrics: Sequence[Dict[str, Any]], path: Union[str, Path]) -> Path:
    """Plot each validated subnet's top-1 across stages and epochs (one line per subnet label) to a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    vals = [m for m in metrics if m.get('type') == 'val']
    points: Dict[str, List[tuple]] = {}
    stage_starts: Dict[str, int] = {}
    for m in vals:
        points.setdefault(m['subnet'], []).append((m['global_step'], m['top1']))
        stage_starts.setdefault(m['stage'], m['global_step'])
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, xy in sorted(points.items()):
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker='o', markersize=3, linewidth=1, label=label)
    for stage, step in stage_starts.items():
        ax.axvline(step, color='grey', linewidth=0.5, linestyle=':')
        ax.annotate(stage, (step, 1), xycoords=('data', 'axes fraction'), rotation=90, fontsize=7, va='top')
    ax.set_xlabel('optimizer step')
    ax.set_ylabel('top-1 (%)')
    ax.set_title('Validation accuracy of BN-recalibrated subnets across progressive-shrinking stages')
    if len(points) <= 16:
        ax.legend(fontsize=6, ncol=2, loc='lower right')
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
