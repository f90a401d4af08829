"""An NNI model space over an ofa_timm elastic supernet, and the weight-sharing subnets it freezes to."""
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ._shims import quiet_nni_import

with quiet_nni_import():
    import nni
    from nni.mutable import Constraint, ConstraintViolation
    from nni.nas.nn.pytorch import ModelSpace

from ofa_timm.elastic.base import ElasticSupernet
from ofa_timm.space import Subnet, SubnetLike

__all__ = ['SupernetSpace', 'SharedSubnet', 'CostConstraint']


class SharedSubnet(nn.Module):
    """One subnet of a supernet, sharing its weights: ``forward`` activates the subnet, then runs the supernet.

    Args:
        supernet: The elastic supernet (not copied).
        subnet: The subnet.
    """

    def __init__(self, supernet: nn.Module, subnet: Subnet):
        super().__init__()
        self.supernet = supernet
        self.subnet = subnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.supernet.set_active(self.subnet)
        return self.supernet(x)

    def extract(self) -> nn.Module:
        """The subnet as a stock timm model with its own copy of the weights."""
        return self.supernet.extract(self.subnet)


class CostConstraint(Constraint):
    """Rejects samples whose subnet costs more than ``max_cost``; NNI's strategies then draw another sample.

    Args:
        space: The model space (its mutables are what the constraint reads).
        cost: Cost of a subnet (FLOPs, latency in ms, parameters ...), e.g. :func:`flops_cost`.
        max_cost: Largest allowed cost.
        label: Label of the constraint in the space.
    """

    def __init__(self, space: 'SupernetSpace', cost: Callable[[Subnet], float], max_cost: float, label: str = 'cost'):
        self.label = label
        self.space = space
        self.cost = cost
        self.max_cost = max_cost
        # The choices it reads, taken before it joins the space (the space's simplify() will include it).
        self._choices = [m for m in space.simplify().values() if not isinstance(m, Constraint)]

    def leaf_mutables(self, is_leaf: Callable[[Any], bool]) -> Iterable[Any]:
        for mutable in self._choices:
            yield from mutable.leaf_mutables(is_leaf)
        yield self

    def check_contains(self, sample: Dict[str, Any]) -> Optional[ConstraintViolation]:
        values = {k: sample[k] for k in self.space.labels if k in sample}
        cost = self.cost(self.space.to_subnet(values))
        if cost > self.max_cost:
            return ConstraintViolation(f'{self.label} {cost:.4g} > {self.max_cost:.4g}')
        return None

    def extra_repr(self) -> str:
        return f'max_cost={self.max_cost!r}, label={self.label!r}'


class SupernetSpace(ModelSpace):
    """NNI ``ModelSpace`` whose choices are the elastic dimensions of an ofa_timm supernet.

    Labels come from the dimensions the family declares: ``stage{s}.{label}`` for a stage-scoped one
    (``stage1.depth``), ``stage{s}.block{b}.{label}`` for a block-scoped one (``stage1.block0.kernel``), ``{label}{i}``
    for a network-scope one with several positions (``width0``) and ``{label}`` for a scalar (``resolution``);
    positions with a single choice are not exposed. ``freeze(sample)`` returns a :class:`SharedSubnet` (weight
    sharing, no copy); :meth:`to_subnet` / :meth:`to_sample` convert NNI samples to :class:`ofa_timm.Subnet` and back.

    Args:
        supernet: An elastic supernet from ``ofa_timm.elasticize`` or ``timm.create_model('ofa_...')``.
        cost: Cost of a subnet (e.g. ``search.flops_cost(supernet)`` or a latency predictor); with ``max_cost``, a
            :class:`CostConstraint` makes subnets above the budget invalid samples.
        max_cost: The budget.
    """

    def __init__(self, supernet: nn.Module, cost: Optional[Callable[[Subnet], float]] = None,
                 max_cost: Optional[float] = None):
        super().__init__()
        if not isinstance(supernet, ElasticSupernet):
            raise ValueError(f'SupernetSpace needs an ofa_timm elastic supernet, got {type(supernet).__name__}')
        self.supernet = supernet
        # label -> (dimension, position), for every position with more than one choice, grouped by stage
        self._positions: Dict[str, Tuple[str, int]] = {}
        for label, name, position, choices in _labels(supernet.space):
            if len(choices) > 1:
                self.add_mutable(nni.choice(label, list(choices)))
                self._positions[label] = (name, position)
        if (cost is None) != (max_cost is None):
            raise ValueError('cost and max_cost go together')
        if cost is not None:
            self.add_mutable(CostConstraint(self, cost, max_cost))

    @property
    def constraints(self) -> List['CostConstraint']:
        return [m for m in self.mutables if isinstance(m, CostConstraint)]

    @property
    def labels(self) -> List[str]:
        """Labels of the exposed choices, stage by stage."""
        return list(self._positions)

    def to_subnet(self, sample: Mapping[str, Any]) -> Subnet:
        """An NNI sample (label -> value) as a validated ``Subnet``; unexposed positions take their only value."""
        unknown = set(sample) - set(self._positions)
        if unknown:
            raise ValueError(f'Unknown labels {sorted(unknown)}; this space has {self.labels}')
        space = self.supernet.space
        values = {name: list(value) if isinstance(value, tuple) else [value] for name, value in space.max().items()}
        for label, value in sample.items():
            name, position = self._positions[label]
            values[name][position] = value
        subnet = Subnet({name: v[0] if space[name].scalar else v for name, v in values.items()})
        return space.validate(subnet)

    def to_sample(self, subnet: SubnetLike) -> Dict[str, Any]:
        """A ``Subnet`` (or its dict/JSON forms) as an NNI sample over :attr:`labels`."""
        subnet = self.supernet.resolve(subnet)
        sample = {}
        for label, (name, position) in self._positions.items():
            value = subnet[name]
            sample[label] = value[position] if isinstance(value, tuple) else value
        return sample

    def freeze(self, sample: Mapping[str, Any]) -> SharedSubnet:
        return SharedSubnet(self.supernet, self.to_subnet(sample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x)


def _labels(space: Any) -> List[Tuple[str, str, int, Tuple[Any, ...]]]:
    """``(label, dimension, position, choices)`` of every position of ``space``, stage by stage (a stage's depth,
    then its blocks' dimensions), then the network-scope ones."""
    rows = []
    for order, d in enumerate(space.dimensions):
        for p, choices in enumerate(d.choices):
            if d.scope == 'stage':
                key, label = (0, p, order, -1), f'stage{p}.{d.label}'
            elif d.scope == 'block':
                stage, block = d.owner(p)
                key, label = (0, stage, order, block), f'stage{stage}.block{block}.{d.label}'
            else:
                key, label = (1, order, p, 0), d.label if d.scalar else f'{d.label}{p}'
            rows.append((key, (label, d.name, p, choices)))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]
