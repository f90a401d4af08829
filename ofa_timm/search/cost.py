"""Analytic cost models: FLOPs and parameters of whole populations of subnets, without building a model.

A supernet's ``describe(subnet)`` lists its blocks, and each block's description depends on a few genes of the space
(``BlockSpec.genes``) and on the resolution. :class:`BlockLayout` enumerates, once per supernet, the description of
every block under every combination of its genes. Any per-block cost (FLOPs, parameters, a measured latency) then
becomes one small table per block, and the cost of a population of encoded subnets is a single fancy-indexed sum
(:class:`AdditiveCost`): a few microseconds per subnet, exact, and family-agnostic.

    flops = flops_model(supernet)
    flops(space.encode(population))       # int64 array, equal to FlopCounterMode on each extracted model
    flops.minimum()                       # (smallest achievable FLOPs, the subnet that has it)
"""
import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn

from ..elastic.base import BlockSpec
from ..space import SearchSpace, Subnet, SubnetLike

__all__ = [
    'BlockLayout', 'AdditiveCost', 'as_codes', 'flops_model', 'params_model', 'format_cost', 'disjoint_groups',
    'SubnetsOrCodes',
]

SubnetsOrCodes = Union[np.ndarray, SubnetLike, Sequence[SubnetLike]]


def as_codes(space: SearchSpace, subnets: SubnetsOrCodes) -> np.ndarray:
    """Subnets (one, a list, or an already encoded ``(N, G)`` / ``(G,)`` integer array) as codes of shape ``(N, G)``.

    Raises:
        ValueError: If a subnet is outside the space, or an array does not hold one in-range index per gene.
    """
    if isinstance(subnets, np.ndarray):
        codes = np.atleast_2d(subnets)
        if codes.ndim != 2 or codes.shape[1] != len(space.genes) or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f'Expected integer codes of shape (N, {len(space.genes)}), got {codes.dtype} '
                             f'{tuple(subnets.shape)}')
        if codes.size and ((codes < 0).any() or (codes >= space.choice_counts).any()):
            raise ValueError("Codes hold a choice index outside its gene's choices")
        return codes.astype(np.int64, copy=False)
    if isinstance(subnets, (Subnet, Mapping, str, os.PathLike)):
        subnets = [subnets]
    return space.encode(list(subnets)).reshape(-1, len(space.genes))


@dataclass(frozen=True)
class _Block:
    name: str
    genes: Tuple[int, ...]
    specs: Tuple[Optional[BlockSpec], ...]  # one per combination of the genes' choices, C order; None: block absent


class BlockLayout:
    """Every block of a supernet with its description under every combination of the genes it depends on.

    Args:
        space: The search space.
        blocks: ``(name, genes, specs)`` per block, ``specs`` in C order over the genes' choices.
        resolutions: Resolutions the costs are tabulated at: the space's, or one fixed resolution for a space without
            a resolution gene.
    """

    def __init__(self, space: SearchSpace, blocks: Sequence[_Block], resolutions: Sequence[int]):
        self.space = space
        self.blocks = tuple(blocks)
        self.resolutions = tuple(resolutions)

    @classmethod
    def from_supernet(cls, supernet: nn.Module, resolution: Optional[int] = None) -> 'BlockLayout':
        """Enumerate ``supernet.describe`` over each block's genes.

        Blocks whose genes do not overlap are enumerated together, so a MobileNetV3 space needs about a hundred
        descriptions rather than one per block and combination.

        Args:
            supernet: An elastic supernet (the family contract's ``describe``).
            resolution: The resolution of a space without a resolution gene (default: the supernet's input size).
        """
        space = supernet.space
        if space.resolutions:
            resolutions = space.resolutions
        else:
            resolutions = (int(resolution or supernet.input_resolution),)
        base = space.encode(space.max())
        names, genes = [], {}
        for spec in supernet.describe(space.max()):  # every block is active in the max subnet
            names.append(spec.name)
            genes[spec.name] = tuple(dict.fromkeys(g for g in spec.genes if len(space.genes[g].choices) > 1))
        specs: Dict[str, List[Optional[BlockSpec]]] = {}
        for group in disjoint_groups(names, genes):
            combos = {name: list(itertools.product(*(range(len(space.genes[g].choices)) for g in genes[name])))
                      for name in group}
            for j in range(max(len(c) for c in combos.values())):
                codes = base.copy()
                for name in group:
                    combo = combos[name][j % len(combos[name])]
                    codes[list(genes[name])] = combo
                described = {s.name: s for s in supernet.describe(space.decode(codes))}
                for name in group:
                    if j < len(combos[name]):
                        specs.setdefault(name, []).append(described.get(name))
        return cls(space, [_Block(n, genes[n], tuple(specs[n])) for n in names], resolutions)

    def tabulate(self, fn: Callable[[BlockSpec, np.ndarray], np.ndarray], dtype: Any = np.int64,
                 **kwargs: Any) -> 'AdditiveCost':
        """An :class:`AdditiveCost` whose block costs are ``fn(spec, resolutions)`` (an array over the resolutions).

        Args:
            fn: Cost of one block description at each resolution; absent blocks cost 0.
            dtype: Table dtype (int64 keeps FLOPs and parameters exact).
            **kwargs: ``name`` and ``unit`` of the cost.
        """
        res = np.asarray(self.resolutions, dtype=np.int64)
        tables = []
        for block in self.blocks:
            table = np.zeros((len(block.specs), len(res)), dtype=dtype)
            for c, spec in enumerate(block.specs):
                if spec is not None:
                    table[c] = fn(spec, res)
            tables.append(table)
        return AdditiveCost(self.space, [b.genes for b in self.blocks], tables, **kwargs)


def disjoint_groups(names: Sequence[str], genes: Mapping[str, Tuple[int, ...]]) -> List[List[str]]:
    """Greedy partition of blocks (by name) into groups whose gene sets do not overlap: one subnet can then set
    every block of a group to any of its combinations at once."""
    groups: List[Tuple[List[str], set]] = []
    for name in names:
        for members, used in groups:
            if not used & set(genes[name]):
                members.append(name)
                used.update(genes[name])
                break
        else:
            groups.append(([name], set(genes[name])))
    return [members for members, _ in groups]


class AdditiveCost:
    """A cost that is a sum of per-block tables, each indexed by the block's genes and the resolution.

    ``cost(codes) = scale * sum_b table_b[combo_b(codes), resolution(codes)] + offset``. Evaluating a population is
    one integer matmul and one gather: the whole of it is vectorised.

    Args:
        space: The search space the codes belong to.
        genes: The gene positions each block's table is indexed by (mixed radix, first gene most significant).
        tables: One ``(combinations, resolutions)`` array per block.
        name: What the cost measures (``'flops'``, ``'params'``, ``'latency'``).
        unit: Unit of the values (``''``, ``'ms'``).
        scale: Multiplies the sum (a fitted latency calibration; must be positive).
        offset: Added to the sum.
    """

    def __init__(
            self,
            space: SearchSpace,
            genes: Sequence[Tuple[int, ...]],
            tables: Sequence[np.ndarray],
            name: str = 'cost',
            unit: str = '',
            scale: float = 1.0,
            offset: float = 0.0,
    ):
        if len(genes) != len(tables):
            raise ValueError(f'{len(genes)} gene tuples for {len(tables)} tables')
        if not scale > 0:
            raise ValueError(f'scale must be positive, got {scale}')
        self.space = space
        self.name = name
        self.unit = unit
        self.scale = float(scale)
        self.offset = float(offset)
        self.genes = tuple(tuple(int(g) for g in gs) for gs in genes)
        self.tables = tuple(np.asarray(t) for t in tables)
        counts = space.choice_counts
        self._res_gene = space.gene_index('resolution') if space.resolutions else None
        n_res = len(space.resolutions) if space.resolutions else 1
        weights = np.zeros((len(space.genes), len(self.tables)), dtype=np.int64)
        offsets = np.zeros(len(self.tables), dtype=np.int64)
        position = 0
        for b, (gs, table) in enumerate(zip(self.genes, self.tables)):
            expected = (int(np.prod([counts[g] for g in gs], dtype=np.int64)), n_res)
            if table.shape != expected:
                raise ValueError(f'Table {b} has shape {table.shape}, expected {expected} for genes {gs}')
            radix = n_res
            for g in reversed(gs):
                weights[g, b] += radix
                radix *= int(counts[g])
            offsets[b] = position
            position += table.size
        self._weights, self._offsets = weights, offsets
        dtype = np.result_type(*self.tables) if self.tables else np.int64
        self._flat = np.concatenate([t.ravel() for t in self.tables]).astype(dtype) if self.tables else np.zeros(1)
        self._extremes: Dict[int, Tuple[float, Subnet]] = {}

    def raw(self, subnets: SubnetsOrCodes) -> np.ndarray:
        """The plain sum of the block tables, before ``scale`` and ``offset``."""
        codes = as_codes(self.space, subnets)
        index = codes @ self._weights + self._offsets
        if self._res_gene is not None:
            index += codes[:, self._res_gene, None]
        return self._flat[index].sum(axis=1)

    def __call__(self, subnets: SubnetsOrCodes) -> np.ndarray:
        """Cost of each subnet, shape ``(N,)`` (int64 for exact integer costs without calibration)."""
        raw = self.raw(subnets)
        if self.scale == 1.0 and self.offset == 0.0:
            return raw
        return raw * self.scale + self.offset

    predict = __call__

    def minimum(self) -> Tuple[float, Subnet]:
        """The smallest cost any subnet of the space has, and one subnet that has it (exact, see :meth:`_extreme`)."""
        return self._extreme(1)

    def maximum(self) -> Tuple[float, Subnet]:
        """The largest cost any subnet of the space has, and one subnet that has it."""
        return self._extreme(-1)

    def _extreme(self, sign: int) -> Tuple[float, Subnet]:
        """Exact min (sign 1) or max (sign -1) of the sum by variable elimination over the genes.

        Each block table is a factor over its genes and the resolution; eliminating one gene at a time (the one whose
        elimination creates the smallest factor) keeps every intermediate table small, since blocks share few genes.
        Measured latencies need not grow with every choice, so the smallest subnet is not simply ``space.min()``.
        """
        if sign in self._extremes:
            return self._extremes[sign]
        counts = [int(c) for c in self.space.choice_counts]
        factors = []
        for gs, table in zip(self.genes, self.tables):
            axes = list(gs) + ([self._res_gene] if self._res_gene is not None else [])
            values = sign * table.astype(np.float64).reshape([counts[g] for g in axes] or [1])
            factors.append(_Factor.make(axes, values if axes else values.reshape(())))
        eliminated = []
        variables = sorted({a for f in factors for a in f.axes})
        while variables:
            def joint_size(v: int) -> int:
                return math.prod(counts[a] for a in {a for f in factors if v in f.axes for a in f.axes})
            v = min(variables, key=joint_size)
            joint = _Factor.sum([f for f in factors if v in f.axes])
            factors = [f for f in factors if v not in f.axes] + [joint.min_out(v)]
            eliminated.append((v, joint))
            variables.remove(v)
        total = sum(float(f.values) for f in factors)
        assignment: Dict[int, int] = {}
        for v, joint in reversed(eliminated):  # every other gene of ``joint`` was eliminated later: assigned already
            index = tuple(slice(None) if a == v else assignment[a] for a in joint.axes)
            assignment[v] = int(np.argmin(joint.values[index]))
        codes = np.array([assignment.get(g, 0) for g in range(len(counts))], dtype=np.int64)
        self._extremes[sign] = (sign * total * self.scale + self.offset, self.space.decode(codes))
        return self._extremes[sign]


@dataclass
class _Factor:
    """A table over some genes (axes in ascending gene order) for variable elimination."""
    axes: Tuple[int, ...]
    values: np.ndarray

    @classmethod
    def make(cls, axes: Sequence[int], values: np.ndarray) -> '_Factor':
        order = np.argsort(axes, kind='stable')
        return cls(tuple(int(axes[i]) for i in order), np.transpose(values, order))

    @classmethod
    def sum(cls, factors: Sequence['_Factor']) -> '_Factor':
        axes = tuple(sorted({a for f in factors for a in f.axes}))
        total: Any = 0.0
        for f in factors:  # sorted axes of a factor keep their order within the union: a reshape aligns them
            total = total + f.values.reshape([f.values.shape[f.axes.index(a)] if a in f.axes else 1 for a in axes])
        return cls(axes, np.asarray(total))

    def min_out(self, axis: int) -> '_Factor':
        i = self.axes.index(axis)
        return _Factor(self.axes[:i] + self.axes[i + 1:], self.values.min(axis=i))


def flops_model(supernet: nn.Module, resolution: Optional[int] = None) -> AdditiveCost:
    """FLOPs (a multiply-add counts 2, as ``FlopCounterMode`` counts) of one image, for any population of subnets.

    Equal to ``count_flops(supernet.extract(subnet), subnet.resolution)`` for every subnet, without building one.

    Args:
        supernet: An elastic supernet.
        resolution: The resolution of a space without a resolution gene (default: the supernet's input size).
    """
    # LayerSpec.flops is written with integer ops that numpy broadcasts over an array of resolutions.
    return BlockLayout.from_supernet(supernet, resolution).tabulate(lambda spec, res: spec.flops(res), name='flops')


def params_model(supernet: nn.Module) -> AdditiveCost:
    """Parameters of the extracted model, for any population of subnets (equal to ``count_params``); a position
    embedding's grow with the resolution."""
    layout = BlockLayout.from_supernet(supernet)
    return layout.tabulate(lambda spec, res: np.broadcast_to(spec.params(res), res.shape), name='params')


def format_cost(value: float, name: str, unit: str = '') -> str:
    """Human form of a cost: ``'312.4M'`` FLOPs or parameters, ``'12.3 ms'`` latency."""
    if unit:
        return f'{value:.3g} {unit}' if value < 100 else f'{value:.1f} {unit}'
    for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= div:
            return f'{value / div:.4g}{suffix}'
    return f'{value:.4g}'
