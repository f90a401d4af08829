"""The pipeline's report: ``report.md`` (a table per budget) and ``pareto.png`` (measured test top-1 of the exported
subnets against their cost, with the predicted front and the budgets)."""
from pathlib import Path
from typing import Any, List, Mapping, Union

import numpy as np

from .._io import atomic_path
from ..search.cost import format_cost
from ..search.report import pareto_front
from ..training.report import source_check_lines

__all__ = ['report_markdown', 'plot_report']

_UNITS = {'latency': 'ms', 'flops': '', 'params': ''}
_AXIS = {'latency': 'latency predicted by the table (ms)', 'flops': 'FLOPs of one image (M, a multiply-add = 2)',
         'params': 'parameters (M)'}


def _cost(value: float, name: str) -> str:
    return format_cost(value, name, _UNITS[name])


def _budget_costs(info: Mapping[str, Any]) -> List[str]:
    """The costs the budgets limit, latency first."""
    used = {k for b in info['budgets'] for k in b['limits']}
    return [c for c in ('latency', 'flops', 'params') if c in used]


def plot_report(info: Mapping[str, Any], models: Mapping[str, Any], predictor: Any, path: Union[str, Path],
                seed: int = 0, sample: int = 4000) -> Path:
    """One panel per limited cost: the exported subnets' measured test top-1 at their cost, the predictor's front
    over random subnets, and each budget on that cost as a dashed line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    costs = _budget_costs(info)
    space = predictor.space
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, space.choice_counts, size=(sample, len(space.genes)))
    predicted = predictor.predict(codes)
    fig, axes = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 4.8), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        div = 1.0 if cost == 'latency' else 1e6
        x = np.asarray(models[cost](codes), dtype=np.float64)
        front = pareto_front(x, predicted)
        ax.scatter(x / div, predicted, s=5, color='0.8', linewidths=0, label='random subnets (predicted top-1)')
        ax.plot(x[front] / div, predicted[front], color='tab:blue', linewidth=1.2,
                label='predicted front (accuracy predictor)')
        for i, b in enumerate(info['budgets']):
            color = plt.cm.viridis(i / max(1, len(info['budgets']) - 1))
            ax.scatter([b['costs'][cost] / div], [b['test_top1']], marker='*', s=200, color=color, edgecolors='black',
                       zorder=5, label=f"{b['label']}: measured test top-1 {b['test_top1']:.1f}%")
            if cost in b['limits']:
                ax.axvline(b['limits'][cost] / div, color=color, linestyle='--', linewidth=0.9)
        ax.set_xlabel(_AXIS[cost])
        ax.set_ylabel('top-1 (%)')
        ax.set_title(f"{info['model']}: best subnet per {cost} budget (dashed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)
    return path


def _timed(b: Mapping[str, Any]) -> str:
    """The latency cell: drift-corrected time and its 95 % interval, flagged when over the budget."""
    t = b.get('latency')
    if not t:
        return f"{_cost(b['latency_measured'], 'latency')}" if b.get('latency_measured') else '-'
    flag = f" **over by {t['over_budget_pct']:.1f}%**" if t.get('over_budget_pct', 0) > 0 else ''
    return f"{t['table_ms']:.3g} ms [{t['low_ms']:.3g}-{t['high_ms']:.3g}]{flag}"


def _latency_note(info: Mapping[str, Any]) -> str:
    if not info.get('latency_measured_here'):
        return 'Latency not timed here (the table is of another device, or there is none).'
    drift = next((b['latency']['drift'] for b in info['budgets'] if b.get('latency')), None)
    return ('"latency timed here": each winner timed now in rounds interleaved with the table\'s anchor subnets, '
            'each round divided by the anchors\' ratio of now to the build, so that it reads in the table\'s terms '
            f'(this machine now runs {drift:.2f}x as long as at the build), with the 95% interval of the median over '
            'rounds. Candidates of a latency budget timed over it were dropped before the choice.')


def _int8_lines(info: Mapping[str, Any]) -> List[str]:
    """Where choosing in INT8 changed the winner, and how the exported INT8 graphs agree with the float ones."""
    lines = []
    for b in info['budgets']:
        f = b.get('fp32_choice')
        if f is None:
            lines.append(f"- {b['label']}: FP32 and INT8 validation top-1 chose the same subnet.")
        else:
            lines.append(f"- {b['label']}: INT8 chose another subnet than FP32 would have. FP32's choice: INT8 test "
                         f"top-1 {f['test_top1_int8']:.2f} (FP32 {f['test_top1']:.2f}); INT8's choice: INT8 test "
                         f"top-1 {b['test_top1_int8']:.2f} (FP32 {b['test_top1']:.2f}).")
    for label, c in (info.get('int8_export') or {}).items():
        lines.append(f"- {label}: the exported `model_int8.onnx` agrees with the float graph on the top-1 of "
                     f"{c['top1_agreement']:.1f}% of {c['images']} validation images.")
    return ['INT8 against FP32:', ''] + lines + ['']


def _teacher_lines(info: Mapping[str, Any]) -> List[str]:
    """The max subnet at the end of the first stage (the teacher the others distil from) beside the winners, both on
    the validation split, so that a weak teacher, which caps every subnet, shows at a glance; from a pretrained
    start, also the source before training beside the max at the end, so that a lost source shows too."""
    stages = (info.get('train') or {}).get('stages')
    if not stages or stages[0].get('max_top1') is None or not info['budgets']:
        return []
    first = stages[0]
    winners = [b['val_top1'] for b in info['budgets']]
    tips = info.get('what_to_try') or []
    lines = [f"Teacher: at the end of the {first['stage']} stage the best validated subnet (as a rule the max subnet, "
             f"which the others learn from) had {first['max_top1']:.1f}% validation top-1; the winners have "
             f"{min(winners):.1f}-{max(winners):.1f}%. If the first is lower than this model should reach on these "
             f"images, every subnet inherits it, so fix it first" + (f": try {'; '.join(tips)}." if tips else '.'), '']
    source = info['train'].get('source')
    if source:  # a pretrained start: what the source scored before training, beside what the max became
        top1 = {int(r) if r != 'None' else None: acc for r, acc in source.items()}  # JSON keys are strings
        measured, *warnings = source_check_lines(top1, info['data']['classes'])
        lines += [f"Source: before training, the max subnet (the source model) had validation top-1 "
                  f"{measured.partition(': ')[2]}; at the end of the last stage ({stages[-1]['stage']}) the best "
                  f"validated subnet had {stages[-1]['max_top1']:.1f}%." + ''.join(' ' + w.strip() for w in warnings),
                  '']
    return lines


def report_markdown(info: Mapping[str, Any], plot: str = 'pareto.png') -> str:
    """``report.md``: the setup, the predictor's and the latency table's quality, and a table per budget."""
    d, p = info['data'], info['predictor']
    lines = [f"# {info['model']}: one subnet per budget", '',
             f"Data: {d['train']:,} training, {d['val']:,} validation and {d['test']:,} test images, {d['classes']} "
             f"classes. The test split ({info['test_source']}) was read by this report alone: training, BN "
             f"recalibration, the accuracy predictor and the choice among finalists used the training and validation "
             f"splits.", '']
    if info.get('augmentation'):
        lines += [f"Training augmentation: {info['augmentation']}.", '']
    train = info.get('train') or {}
    if train.get('stages'):
        stages = ', '.join(f"{s['stage']} {s['top1']:.1f}" for s in train['stages'])
        lines += [f"Training: {train['steps']:,} optimizer steps of progressive shrinking; mean validation top-1 of "
                  f"the validated subnets at the end of each stage: {stages}.", '']
    elif train.get('checkpoint'):
        lines += [f"Training: the trained supernet `{train['checkpoint']}`.", '']
    acc = info['accuracy']
    lines += [f"Accuracy predictor: fitted on {p['n_train']} of {acc['n']} random subnets (validation top-1 "
              f"{acc['top1_min']:.1f}-{acc['top1_max']:.1f}%); on the {p['n_val']} held-out subnets, RMSE "
              f"{p['rmse']:.2f} points and Spearman {p['spearman']:.3f}.", '']
    lat = info.get('latency')
    if lat:
        from ..search.latency import validation_summary
        val = validation_summary(lat['validation']) if lat.get('validation') else 'not validated'
        lines += [f"Latency table: {lat['describe']}; {val}.", '']
    int8 = info.get('precision') == 'int8'
    lines += ['| budget | test top-1 |' + (' INT8 test top-1 |' if int8 else '') + ' test top-5 | val top-1 | '
              'predicted | best random subnet in budget: test top-1 | gain | latency predicted | latency timed here '
              '| FLOPs | params |',
              '|---|---:|' + ('---:|' if int8 else '') + '---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for b in info['budgets']:
        rb = b['random_best']
        c = b['costs']
        int8_cell = f" {b['test_top1_int8']:.2f} |" if int8 else ''
        lines.append(f"| {b['label']} | {b['test_top1']:.2f} |{int8_cell} {b['test_top5']:.2f} | {b['val_top1']:.2f} "
                     f"| {b['predicted_top1']:.2f} | " + (
                         f"{rb['test_top1']:.2f} | {b['test_top1'] - rb['test_top1']:+.2f} | " if rb else
                         'none met it | | '))
        lines[-1] += (f"{_cost(c['latency'], 'latency') if 'latency' in c else '-'} | {_timed(b)} | "
                      f"{_cost(c['flops'], 'flops')} | {_cost(c['params'], 'params')} |")
    top1 = 'Top-1 in %' + (' (INT8: the QDQ graph run by ONNX Runtime; the winners were chosen by their INT8 '
                           'validation top-1)' if int8 else '')
    lines += ['', f'{top1}. "val top-1" chose the winner among the finalists; "best random subnet in budget" is '
              f'the best (by validation top-1) of the randomly evaluated subnets that meet the budget, and "gain" what '
              f'the search added on the test split. {_latency_note(info)}', '']
    lines += _teacher_lines(info)
    over = [b for b in info['budgets'] if (b.get('latency') or {}).get('over_budget_pct', 0) > 0]
    for b in over:
        t = b['latency']
        lines += [f"**{b['label']} is over its budget as timed here**: {t['table_ms']:.3g} ms (95% interval "
                  f"{t['low_ms']:.3g}-{t['high_ms']:.3g}) against {b['limits']['latency']:.3g} ms, "
                  f"{t['over_budget_pct']:.1f}% over" + (
                      '; the interval reaches below the budget, so this is within the noise of the measurement.'
                      if t['low_ms'] <= b['limits']['latency'] else '.'), '']
    if int8:
        lines += _int8_lines(info)
    lines += [f'![Pareto]({plot})', '']
    for b in info['budgets']:
        limits = ', '.join(f'{k} <= {_cost(v, k)}' for k, v in b['limits'].items())
        int8_text = f", INT8 top-1 {b['test_top1_int8']:.2f}%" if int8 else ''
        lines += [f"## {b['label']}", '', f'- Budget: {limits}', f"- Subnet: `{b['subnet']}`",
                  f"- Test top-1 {b['test_top1']:.2f}%, top-5 {b['test_top5']:.2f}%{int8_text}",
                  f"- Files: {', '.join(f'`{f}`' for f in b['files'])}", f"- Load: `{b['load']}`", '']
    return '\n'.join(lines)
