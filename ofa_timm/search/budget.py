"""Budgets as text: what a deployment target allows.

One budget is one or more limits joined by ``+``, all of which a subnet must meet; a list of budgets is separated by
commas::

    5ms,10ms,20ms               latency (needs a latency table)
    150MFLOPs,1.2GFLOPs         FLOPs of one image (k/M/G prefixes; a multiply-add counts 2)
    3Mparams                    parameters (k/M prefixes)
    10ms+300MFLOPs              both at once
    25%latency,50%flops         a share of the way from the space's cheapest to its most expensive subnet
"""
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from .cost import format_cost

__all__ = ['Budget', 'parse_budgets', 'COSTS']

COSTS: Dict[str, str] = {'latency': 'ms', 'flops': '', 'params': ''}  # cost -> unit
_PREFIX = {'': 1.0, 'k': 1e3, 'm': 1e6, 'g': 1e9}
_TERM = re.compile(r'^(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<ms>ms)|(?P<prefix>[kmg]?)(?P<cost>flops|params)|'
                   r'%(?P<share>latency|flops|params))$', re.I)


@dataclass(frozen=True)
class Budget:
    """Limits a subnet must meet together.

    Args:
        limits: ``(cost, value)`` pairs: an absolute limit in the cost's unit (ms, FLOPs, parameters), or, for
            ``relative`` ones, a share in [0, 1] of the way from the cheapest subnet's cost to the most expensive's.
        relative: Which of ``limits`` are shares.
    """
    limits: Tuple[Tuple[str, float], ...]
    relative: Tuple[bool, ...]

    @property
    def costs(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.limits)

    def resolve(self, models: Mapping[str, Any]) -> Dict[str, float]:
        """Absolute limits, given the cost models by name (their ``minimum()`` and ``maximum()`` place shares)."""
        out = {}
        for (name, value), relative in zip(self.limits, self.relative):
            if name not in models:
                raise ValueError(f'Budget {self.label} needs a {name} cost model' + (
                    ' (a latency table)' if name == 'latency' else ''))
            if relative:
                low, high = models[name].minimum()[0], models[name].maximum()[0]
                value = low + value * (high - low)
            out[name] = float(value)
        return out

    @property
    def label(self) -> str:
        """A name for files and tables: ``latency_10ms``, ``flops_300M``, ``latency_25pct+flops_300M``."""
        parts = []
        for (name, value), relative in zip(self.limits, self.relative):
            text = f'{value * 100:g}pct' if relative else format_cost(value, name, COSTS[name]).replace(' ', '')
            parts.append(f'{name}_{text}')
        return '+'.join(parts)


def parse_budgets(budgets: Union[str, Sequence[Union[str, Budget]]]) -> List[Budget]:
    """Budgets from text (see the module's docstring) or a list of texts and ``Budget`` s.

    Raises:
        ValueError: Naming the term it cannot read and the forms it takes.
    """
    if isinstance(budgets, str):
        budgets = [t for t in budgets.split(',') if t.strip()]
    items: List[Union[str, Budget]] = list(budgets)
    out = []
    for item in items:
        if isinstance(item, Budget):
            out.append(item)
            continue
        limits, relative = [], []
        for term in (t.strip() for t in str(item).split('+')):
            m = _TERM.match(term)
            if not m:
                raise ValueError(f'Cannot read budget {term!r}: expected e.g. 20ms, 300MFLOPs, 5Mparams, 25%latency, '
                                 f'or limits joined by + (10ms+300MFLOPs)')
            value = float(m['value'])
            if m['share']:
                if value > 100:
                    raise ValueError(f'Budget {term!r}: a share must be within 0-100%')
                limits.append((m['share'].lower(), value / 100))
                relative.append(True)
            else:
                name = 'latency' if m['ms'] else m['cost'].lower()
                limits.append((name, value * _PREFIX[(m['prefix'] or '').lower()]))
                relative.append(False)
        names = [n for n, _ in limits]
        if len(set(names)) != len(names):
            raise ValueError(f'Budget {item!r} limits the same cost twice')
        out.append(Budget(tuple(limits), tuple(relative)))
    if not out:
        raise ValueError('No budget given: e.g. 10ms,20ms or 150MFLOPs,300MFLOPs')
    return out
