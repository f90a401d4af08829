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

    Labels: ``stage{s}.depth``, ``stage{s}.block{b}.kernel``, ``stage{s}.block{b}.expand``, ``width{i}`` and
    ``resolution``; dimensions with a single choice are not exposed. ``freeze(sample)`` returns a
    :class:`SharedSubnet` (weight sharing, no copy); :meth:`to_subnet` / :meth:`to_sample` convert NNI samples to
    :class:`ofa_timm.Subnet` and back.

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
        self._labels: List[Tuple[str, Tuple[Any, ...]]] = []
        space = supernet.space
        for s, stage in enumerate(space.stages):
            self._declare(f'stage{s}.depth', stage.depths)
            for b, choices in enumerate(stage.kernels):
                self._declare(f'stage{s}.block{b}.kernel', choices)
            for b, choices in enumerate(stage.expands):
                self._declare(f'stage{s}.block{b}.expand', choices)
        for i, choices in enumerate(space.widths):
            self._declare(f'width{i}', choices)
        self._declare('resolution', space.resolutions)
        if (cost is None) != (max_cost is None):
            raise ValueError('cost and max_cost go together')
        if cost is not None:
            self.add_mutable(CostConstraint(self, cost, max_cost))

    @property
    def constraints(self) -> List['CostConstraint']:
        return [m for m in self.mutables if isinstance(m, CostConstraint)]

    def _declare(self, label: str, choices: Tuple[Any, ...]) -> None:
        if len(choices) > 1:
            self.add_mutable(nni.choice(label, list(choices)))
            self._labels.append((label, tuple(choices)))

    @property
    def labels(self) -> List[str]:
        """Labels of the exposed choices, in space order."""
        return [label for label, _ in self._labels]

    def to_subnet(self, sample: Mapping[str, Any]) -> Subnet:
        """An NNI sample (label -> value) as a validated ``Subnet``; unexposed dimensions take their only value."""
        unknown = set(sample) - set(self.labels)
        if unknown:
            raise ValueError(f'Unknown labels {sorted(unknown)}; this space has {self.labels}')
        space = self.supernet.space
        mx = space.max()

        def value(label: str, default: Any) -> Any:
            return sample.get(label, default)

        depths, kernels, expands = [], [], []
        k_slot = e_slot = 0
        for s, stage in enumerate(space.stages):
            depths.append(value(f'stage{s}.depth', mx.depths[s]))
            for b in range(len(stage.kernels)):
                kernels.append(value(f'stage{s}.block{b}.kernel', mx.kernels[k_slot]))
                k_slot += 1
            for b in range(len(stage.expands)):
                expands.append(value(f'stage{s}.block{b}.expand', mx.expands[e_slot]))
                e_slot += 1
        widths = [value(f'width{i}', w) for i, w in enumerate(mx.widths)]
        subnet = Subnet(depths=depths, kernels=kernels, expands=expands, widths=widths,
                        resolution=value('resolution', mx.resolution))
        return space.validate(subnet)

    def to_sample(self, subnet: SubnetLike) -> Dict[str, Any]:
        """A ``Subnet`` (or its dict/JSON forms) as an NNI sample over :attr:`labels`."""
        subnet = self.supernet.resolve(subnet)
        space = self.supernet.space
        sample: Dict[str, Any] = {}
        k_slot = e_slot = 0
        for s, stage in enumerate(space.stages):
            sample[f'stage{s}.depth'] = subnet.depths[s]
            for b in range(len(stage.kernels)):
                sample[f'stage{s}.block{b}.kernel'] = subnet.kernels[k_slot]
                k_slot += 1
            for b in range(len(stage.expands)):
                sample[f'stage{s}.block{b}.expand'] = subnet.expands[e_slot]
                e_slot += 1
        for i, w in enumerate(subnet.widths):
            sample[f'width{i}'] = w
        sample['resolution'] = subnet.resolution
        return {label: sample[label] for label in self.labels}

    def freeze(self, sample: Mapping[str, Any]) -> SharedSubnet:
        return SharedSubnet(self.supernet, self.to_subnet(sample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x)
