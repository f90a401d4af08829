"""Elastic dimensions, the search spaces they make up, and the subnets that live in them.

A supernet family declares its elastic dimensions, each a :class:`Dimension`: a name, a scope (``'network'``: one or
a few positions of the whole network; ``'stage'``: one position per stage; ``'block'``: one position per block slot),
the values allowed at each position from the smallest to the largest, and how progressive shrinking treats it. A
:class:`SearchSpace` is the tuple of those declarations, with any :class:`Constraint` between them. Everything that
varies a subnet is derived from it: sampling (max, min, mid, random), validation, the integer encoding that evolution
and the predictor read (one :class:`Gene` per position), the stages of a progressive-shrinking recipe, NNI's labels
and the cost models' enumeration. No part of the package lists dimensions by hand.

Two dimensions mean something to the package itself: ``resolution`` (a network-scope scalar: the input size, which
data loaders resize to) and ``depths`` (one position per stage: how many of its blocks run). A block slot is active
when its stage's depth exceeds its index in the stage; a stage with a maximum depth of 4 owns 4 consecutive positions
of every block-scoped dimension whether or not a subnet activates them, and values in inactive slots must still be
valid choices, which keeps the reference implementation's fixed-length encoding usable as is.

A :class:`Subnet` holds one value, or one value per position, for each dimension by name: immutable, hashable,
validated by the space, and written to JSON as ``{name: value}`` (``{"resolution": 160, "depths": [2, 3, ...],
"kernels": [...], ...}``; the files of 0.2.0 read unchanged).
"""
import functools
import json
import math
import operator
import os
import random
from dataclasses import FrozenInstanceError, dataclass, field, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._io import write_text_atomic

__all__ = [
    'Subnet', 'Dimension', 'Constraint', 'SearchSpace', 'StageChoices', 'Gene', 'SubnetLike', 'RandomLike',
    'OFA_RESOLUTIONS', 'RESOLUTION', 'DEPTHS', 'SCOPES', 'SPACE_FORMAT',
]

# OFA's elastic resolutions.
OFA_RESOLUTIONS: Tuple[int, ...] = tuple(range(128, 225, 4))
#: The dimension that sets the input size (a network-scope scalar), and the one that sets how many blocks of each
#: stage run (one position per stage); block-scoped dimensions are active where the latter allows.
RESOLUTION = 'resolution'
DEPTHS = 'depths'
SCOPES: Tuple[str, ...] = ('network', 'stage', 'block')
#: Version of :meth:`SearchSpace.to_dict`; dicts without one are 0.2.0's classic layout (stages, widths, resolutions).
SPACE_FORMAT = 2
# Keys of the reference implementation's subnet dicts; a supernet reads those (ElasticSupernet.resolve).
_REFERENCE_KEYS = frozenset({'ks', 'e', 'd', 'r', 'w', 'wid'})
# 0.2.0's Subnet had these fields, empty when a family lacked them: they still read as empty there.
_CLASSIC_FIELDS = ('depths', 'kernels', 'expands', 'widths')

Number = Union[int, float]
Level = Union[str, int]
RandomLike = Union[None, int, random.Random, np.random.Generator]


def _number(value: Any, where: str) -> Number:
    """A finite, non-negative Python int or float (numpy scalars converted); a ValueError naming ``where`` else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f'{where} must be a number, got {type(value).__name__} {value!r}')
    value = value.item() if isinstance(value, (np.integer, np.floating)) else value
    if not math.isfinite(value) or value < 0:
        raise ValueError(f'{where} must be a finite number >= 0, got {value!r}')
    return value


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f'{where} must be an integer, got bool {value!r}')
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f'{where} must be an integer, got {type(value).__name__} {value!r}') from None


def _is_list(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


# --- subnets ----------------------------------------------------------------------------------------------------------
class Subnet:
    """One architecture of an elastic supernet: a value (or a tuple of values, one per position) per dimension.

    ``Subnet(depths=[2, 3, 4], kernels=[...], expands=[...], resolution=160)`` or ``Subnet({'heads': [...], ...})``;
    values read as attributes (``subnet.kernels``) or items (``subnet['kernels']``). Empty lists and a ``None``
    resolution mean the dimension is absent: ``subnet.resolution`` is then None, and the dimensions of 0.2.0's
    subnets (``depths``, ``kernels``, ``expands``, ``widths``) read as empty tuples. Which names and values are
    allowed is the space's to say (``SearchSpace.validate``); a subnet alone only checks that its values are
    finite, non-negative numbers.

    Raises:
        ValueError: On a name that is not an identifier or a value that is not a number or a list of numbers.
    """
    __slots__ = ('_values',)

    def __init__(self, values: Optional[Mapping[str, Any]] = None, **dimensions: Any):
        items = dict(values._values if isinstance(values, Subnet) else values or {})
        items.update(dimensions)
        normalized: Dict[str, Union[Number, Tuple[Number, ...]]] = {}
        for name, value in items.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f'Subnet dimension names are identifiers, got {name!r}')
            if value is None:
                continue
            if _is_list(value):
                value = tuple(_number(v, f'Subnet.{name}[{i}]') for i, v in enumerate(value))
                if not value:
                    continue
            elif isinstance(value, (str, bytes)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f'Subnet.{name} must be a number or a list of numbers, got '
                                 f'{type(value).__name__} {value!r}')
            else:
                value = _number(value, f'Subnet.{name}')
            normalized[name] = value
        object.__setattr__(self, '_values', normalized)

    # --- access -------------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith('__'):
            raise AttributeError(name)
        values = object.__getattribute__(self, '_values')
        if name in values:
            return values[name]
        if name == RESOLUTION:
            return None
        if name in _CLASSIC_FIELDS:
            return ()
        raise AttributeError(f'Subnet has no dimension {name!r}; it has {list(values)}')

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    @property
    def names(self) -> Tuple[str, ...]:
        """The dimensions the subnet has values for."""
        return tuple(self._values)

    def items(self) -> Iterator[Tuple[str, Any]]:
        return iter(self._values.items())

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f'Subnet is immutable: use subnet.replace({name}=...)')

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError('Subnet is immutable')

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subnet) and self._values == other._values

    def __hash__(self) -> int:
        return hash(frozenset(self._values.items()))

    def __repr__(self) -> str:
        return f"Subnet({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self) -> Tuple[Any, ...]:
        return Subnet, (dict(self._values),)

    def replace(self, **changes: Any) -> 'Subnet':
        """A copy with some dimensions set to other values (None or an empty list removes one)."""
        return Subnet({**self._values, **changes})

    # --- files --------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict: ``resolution`` first, then every other dimension, lists for per-position values."""
        out: Dict[str, Any] = {}
        if RESOLUTION in self._values:
            out[RESOLUTION] = self._values[RESOLUTION]
        for name, value in self._values.items():
            if name != RESOLUTION:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'Subnet':
        """Read a subnet dict of this project's form (:meth:`to_dict`).

        The reference OFA implementation's forms (``{'ks', 'e', 'd'}``, ``{'d', 'e', 'w'}``) depend on the supernet
        family; read them with ``supernet.resolve(d)`` or ``timm.create_model(name, subnet=d)``.

        Raises:
            ValueError: On a dict of the reference's form, or malformed names or values.
        """
        if isinstance(d, Subnet):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f'A subnet dict must be a mapping, got {type(d).__name__}')
        if d and set(d) <= _REFERENCE_KEYS:
            raise ValueError(
                f'Subnet dict keys {sorted(d)} are the reference implementation\'s form, which depends on the '
                f'supernet family: read it with supernet.resolve(d) or timm.create_model(name, subnet=d)')
        return cls(d)

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write the subnet as JSON, atomically (a reader never sees a half-written file)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + '\n')

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> 'Subnet':
        """Read a subnet JSON file written by :meth:`to_json`."""
        return cls.from_dict(read_json(path))

    @classmethod
    def parse(cls, value: 'SubnetLike') -> 'Subnet':
        """Coerce a ``Subnet``, a subnet dict or a path to a JSON file into a ``Subnet``."""
        if isinstance(value, Subnet):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            if not os.path.isfile(value):
                raise ValueError(f'Subnet file {os.fspath(value)!r} does not exist')
            return cls.from_json(value)
        raise ValueError(
            f'Cannot read a subnet from {type(value).__name__}; expected a Subnet, a dict or a JSON file path')


SubnetLike = Union[Subnet, Mapping[str, Any], str, os.PathLike]


def read_json(path: Union[str, os.PathLike]) -> Any:
    """Parse a JSON file.

    Raises:
        ValueError: Naming the file, if it cannot be read or is not valid JSON.
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{os.fspath(path)} is not valid JSON: {e}') from None
    except OSError as e:
        raise ValueError(f'Cannot read {os.fspath(path)}: {e.strerror}') from None


# --- declarations -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One elastic dimension, as a supernet family declares it.

    Args:
        name: The name subnets use for it (``'kernels'``, ``'heads'``, ``'resolution'``); an identifier.
        scope: ``'network'`` (positions that no depth switches off: the resolution, a width multiplier per stem
            conv), ``'stage'`` (one position per stage: ``depths``) or ``'block'`` (one position per block slot,
            active where its stage's depth exceeds its index in the stage).
        choices: The values allowed at each position, from the smallest subnet's to the largest's; the last one is the
            max subnet's (the source model's, for a converted model).
        stages: For a block-scoped dimension, the stage of each position (an index into ``depths``' positions).
        blocks: For a block-scoped dimension, the index of each position within its stage.
        scalar: One position whose value is written as a number, not a list (``resolution``, ``embed_dim``).
        integer: Values are integers (else any number; ``SearchSpace.validate`` returns them as floats).
        label: The name schedules, stage names and NNI labels use (default: ``name`` without a plural ``s``).
        shrink_order: Where progressive shrinking unlocks it: 0 with the first shrinking stage and in every one after
            (``resolution``); 1, 2, ... in that order, each with stages of its own; None: never (single choices).
        phases: Stages it is unlocked in: 1 (all its choices at once, as OFA's kernel stage) or 2 (its two largest
            choices, then all, as OFA's depth and expand stages).
        ranked: The family ranks what the dimension keeps (channels, heads) by importance before the first stage that
            shrinks it (``ElasticSupernet.rank``), as OFA sorts channels before its expand stage.
        doc: What a value means for this family (``'mid channels = make_divisible(in_chs * e)'``).
    """
    name: str
    scope: str
    choices: Tuple[Tuple[Number, ...], ...]
    stages: Tuple[int, ...] = ()
    blocks: Tuple[int, ...] = ()
    scalar: bool = False
    integer: bool = True
    label: str = field(default='', compare=False)
    shrink_order: Optional[int] = field(default=None, compare=False)
    phases: int = field(default=2, compare=False)
    ranked: bool = field(default=False, compare=False)
    doc: str = field(default='', compare=False)

    def __post_init__(self) -> None:
        where = f'Dimension {self.name!r}'
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f'A dimension name is an identifier, got {self.name!r}')
        if self.scope not in SCOPES:
            raise ValueError(f'{where}: scope {self.scope!r} is not one of {list(SCOPES)}')
        choices = []
        for p, values in enumerate(self.choices):
            kind = _as_int if self.integer else _number
            values = tuple(kind(v, f'{where} position {p}') for v in values)
            if not values:
                raise ValueError(f'{where}: position {p} has no choices')
            if len(set(values)) != len(values):
                raise ValueError(f'{where}: position {p} repeats a choice: {list(values)}')
            choices.append(values if self.integer else tuple(float(v) for v in values))
        stages, blocks = tuple(int(s) for s in self.stages), tuple(int(b) for b in self.blocks)
        if self.scope == 'block' and not (len(stages) == len(blocks) == len(choices)):
            raise ValueError(f'{where}: a block-scoped dimension names the stage and block of each of its '
                             f'{len(choices)} positions, got {len(stages)} stages and {len(blocks)} blocks')
        if self.scope != 'block' and (stages or blocks):
            raise ValueError(f'{where}: only a block-scoped dimension has stages and blocks')
        if self.scalar and len(choices) != 1:
            raise ValueError(f'{where}: a scalar dimension has one position, got {len(choices)}')
        if self.phases not in (1, 2):
            raise ValueError(f'{where}: phases must be 1 or 2, got {self.phases}')
        label = self.label or (self.name[:-1] if self.name.endswith('s') and len(self.name) > 1 else self.name)
        object.__setattr__(self, 'choices', tuple(choices))
        object.__setattr__(self, 'stages', stages)
        object.__setattr__(self, 'blocks', blocks)
        object.__setattr__(self, 'label', label)

    @classmethod
    def per_stage(cls, name: str, choices: Sequence[Sequence[Number]], **kwargs: Any) -> 'Dimension':
        """A stage-scoped dimension: one position per stage."""
        return cls(name, 'stage', tuple(tuple(c) for c in choices), **kwargs)

    @classmethod
    def per_block(cls, name: str, choices: Mapping[Tuple[int, int], Sequence[Number]], **kwargs: Any) -> 'Dimension':
        """A block-scoped dimension from ``{(stage, block): choices}``, in that order."""
        owners = list(choices)
        return cls(name, 'block', tuple(tuple(choices[o]) for o in owners), stages=tuple(s for s, _ in owners),
                   blocks=tuple(b for _, b in owners), **kwargs)

    @classmethod
    def network(cls, name: str, choices: Sequence[Number], **kwargs: Any) -> 'Dimension':
        """A network-scope scalar (``resolution``, an embedding width)."""
        return cls(name, 'network', (tuple(choices),), scalar=True, **kwargs)

    @property
    def elastic(self) -> bool:
        """Whether some position has more than one choice."""
        return any(len(c) > 1 for c in self.choices)

    def owner(self, position: int) -> Tuple[int, int]:
        """The (stage, block) a position of a block-scoped dimension belongs to."""
        return self.stages[position], self.blocks[position]

    def where(self, position: Optional[int]) -> str:
        """How an error names a position: ``kernels[3]`` (stage 1 block 0)."""
        if self.scalar or position is None:
            return self.name
        text = f'{self.name}[{position}]'
        if self.scope == 'block':
            text += f' (stage {self.stages[position]} block {self.blocks[position]})'
        elif self.scope == 'stage':
            text += f' (stage {position})'
        return text

    def to_dict(self) -> Dict[str, Any]:
        d = dict(name=self.name, scope=self.scope, choices=[list(c) for c in self.choices], scalar=self.scalar,
                 integer=self.integer, label=self.label, shrink_order=self.shrink_order, phases=self.phases,
                 ranked=self.ranked)
        if self.scope == 'block':
            d.update(stages=list(self.stages), blocks=list(self.blocks))
        if self.doc:
            d['doc'] = self.doc
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'Dimension':
        known = {'name', 'scope', 'choices', 'stages', 'blocks', 'scalar', 'integer', 'label', 'shrink_order',
                 'phases', 'ranked', 'doc'}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f'Unknown dimension keys {sorted(unknown)}; allowed: {sorted(known)}')
        return cls(**{**d, 'choices': tuple(tuple(c) for c in d['choices']),
                      'stages': tuple(d.get('stages', ())), 'blocks': tuple(d.get('blocks', ()))})


_OPS = ('divides', '<=', '>=')


@dataclass(frozen=True)
class Constraint:
    """A relation two dimensions' values must satisfy: ``lhs <op> rhs`` (``op``: ``'divides'``, ``'<='``,
    ``'>='``).

    It holds position by position where both dimensions have the same scope and number of positions, and for every
    pair of positions otherwise (a head count that must divide a network's embedding width: ``Constraint('heads',
    'divides', 'embed_dim')``). Sampling redraws, validation refuses and evolution discards what breaks it.
    """
    lhs: str
    op: str
    rhs: str

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f'Constraint op {self.op!r} is not one of {list(_OPS)}')

    def holds(self, a: Number, b: Number) -> bool:
        if self.op == 'divides':
            return a != 0 and (b / a).is_integer()
        return a <= b if self.op == '<=' else a >= b

    def __str__(self) -> str:
        return f'{self.lhs} {self.op} {self.rhs}'


@dataclass(frozen=True)
class Gene:
    """One position of a subnet and its choices: ``kernels[3]``, ``depths[1]``, ``resolution``. A subnet is encoded
    as the index of its value in each gene's choices.

    Args:
        field: The dimension's name.
        index: The position (None for a scalar dimension).
        choices: Allowed values, from the smallest subnet's to the largest's.
    """
    field: str
    index: Optional[int]
    choices: Tuple[Any, ...]

    @property
    def name(self) -> str:
        return self.field if self.index is None else f'{self.field}[{self.index}]'


def _pick(rng: Union[random.Random, np.random.Generator], choices: Sequence[Any]) -> Any:
    if isinstance(rng, np.random.Generator):
        return choices[int(rng.integers(len(choices)))]
    return choices[rng.randrange(len(choices))]


def _describe_choices(choices: Sequence[Any]) -> str:
    choices = list(choices)
    if len(choices) > 4 and all(isinstance(c, int) for c in choices):
        steps = {b - a for a, b in zip(choices, choices[1:])}
        if len(steps) == 1:
            return f'{choices[0]}..{choices[-1]} (step {steps.pop()})'
    return str(choices)


def _top(choices: Tuple[Any, ...], level: Optional[Level]) -> Tuple[Any, ...]:
    if level is None:
        return choices[-1:]
    if level == 'all':
        return choices
    return choices[-int(level):]


class SearchSpace:
    """The choices of an elastic supernet: its declared dimensions and the constraints between them.

    Args:
        dimensions: The family's declarations, in the order of the subnet's genes.
        constraints: Relations between dimensions that every subnet satisfies.

    Raises:
        ValueError: On repeated names, a block-scoped dimension without ``depths`` (or whose slots lie beyond a
            stage's maximum depth), or constraints that name unknown dimensions or that the max or min subnet breaks.
    """

    def __init__(self, dimensions: Sequence[Dimension], constraints: Sequence[Constraint] = ()):
        dimensions = tuple(dimensions)
        if not all(isinstance(d, Dimension) for d in dimensions):
            raise ValueError('SearchSpace takes Dimension declarations (SearchSpace.from_stages builds the classic '
                             'layout of stages, widths and resolutions)')
        names = [d.name for d in dimensions]
        if len(set(names)) != len(names):
            raise ValueError(f'Dimension names must be unique, got {names}')
        self._dimensions = dimensions
        self._by_name = {d.name: d for d in dimensions}
        self._constraints = tuple(constraints)
        depths = self._by_name.get(DEPTHS)
        if depths is not None and depths.scope != 'stage':
            raise ValueError(f'The {DEPTHS!r} dimension is stage-scoped, got {depths.scope!r}')
        for d in dimensions:
            if d.scope != 'block':
                continue
            if depths is None:
                raise ValueError(f'Block-scoped dimension {d.name!r} needs a {DEPTHS!r} dimension to own its slots')
            for p, (s, b) in enumerate(zip(d.stages, d.blocks)):
                if not 0 <= s < len(depths.choices) or not 0 <= b < max(depths.choices[s]):
                    raise ValueError(f'{d.where(p)} lies outside the stages and their maximum depths')
        resolution = self._by_name.get(RESOLUTION)
        if resolution is not None and not (resolution.scalar and resolution.integer):
            raise ValueError(f'The {RESOLUTION!r} dimension is an integer scalar')
        for c in self._constraints:
            for name in (c.lhs, c.rhs):
                if name not in self._by_name:
                    raise ValueError(f'Constraint {c} names {name!r}, which is not a dimension of the space: {names}')
        for extreme in ('max', 'min'):
            broken = self._broken(self._build(lambda ch: ch[-1] if extreme == 'max' else ch[0]))
            if broken:
                raise ValueError(f'The {extreme} subnet of the space breaks its constraint {broken}')

    # --- declarations -------------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> Tuple[Dimension, ...]:
        return self._dimensions

    @property
    def constraints(self) -> Tuple[Constraint, ...]:
        return self._constraints

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._by_name)

    def __getitem__(self, name: str) -> Dimension:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f'The space has no dimension {name!r}; it has {list(self._by_name)}') from None

    def has(self, name: str) -> bool:
        """Whether the space declares ``name``."""
        return name in self._by_name

    def by_label(self, key: str) -> Dimension:
        """The dimension a schedule or an NNI label names, by its label or its name.

        Raises:
            ValueError: Naming the space's dimensions, if none matches.
        """
        for d in self._dimensions:
            if key in (d.label, d.name):
                return d
        raise ValueError(f'Unknown dimension {key!r}; this space has '
                         f'{[d.label for d in self._dimensions]} (or by name {list(self._by_name)})')

    @property
    def resolutions(self) -> Tuple[int, ...]:
        """The allowed input resolutions (empty where the space does not declare them)."""
        d = self._by_name.get(RESOLUTION)
        return d.choices[0] if d is not None else ()

    @property
    def elastic(self) -> Tuple[str, ...]:
        """Names of the dimensions with more than one choice somewhere."""
        return tuple(d.name for d in self._dimensions if d.elastic)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and (self._dimensions, self._constraints) == (
            other._dimensions, other._constraints)

    def __hash__(self) -> int:
        return hash((self._dimensions, self._constraints))

    def __repr__(self) -> str:
        dims = ', '.join(f'{d.name}[{len(d.choices)}]' for d in self._dimensions)
        return f'SearchSpace({dims}; {self.size():.3g} subnets)'

    # --- the classic layout of 0.2.0 ----------------------------------------------------------------------------
    @classmethod
    def from_stages(cls, stages: Sequence['StageChoices'], widths: Sequence[Sequence[float]] = (),
                    resolutions: Sequence[int] = ()) -> 'SearchSpace':
        """The classic CNN layout (0.2.0's ``SearchSpace(stages, widths, resolutions)``): a depth per stage, a kernel
        and an expand ratio per block slot, width multipliers and resolutions, with OFA's progressive shrinking
        (kernel, then depth, expand and width, each in two phases; channels ranked before the expand stages)."""
        stages = tuple(stages)
        dims = [Dimension.per_stage(DEPTHS, [s.depths for s in stages], shrink_order=2)]
        for name, order, phases, integer in (('kernels', 1, 1, True), ('expands', 3, 2, False)):
            slots = {(s, b): c for s, stage in enumerate(stages) for b, c in enumerate(getattr(stage, name))}
            if slots:
                dims.append(Dimension.per_block(name, slots, shrink_order=order, phases=phases, integer=integer,
                                                ranked=name == 'expands'))
        if widths:
            dims.append(Dimension('widths', 'network', tuple(tuple(w) for w in widths), integer=False,
                                  shrink_order=4))
        if resolutions:
            dims.append(Dimension.network(RESOLUTION, sorted(set(resolutions)), shrink_order=0))
        return cls(dims)

    @property
    def stages(self) -> Tuple['StageChoices', ...]:
        """The classic layout's view: depth, kernel and expand choices per stage."""
        depths = self._by_name.get(DEPTHS)
        if depths is None:
            return ()
        slots = {name: self._by_name[name] for name in ('kernels', 'expands') if name in self._by_name}
        return tuple(StageChoices(
            depths=ds, **{name: tuple(c for c, st in zip(d.choices, d.stages) if st == s) for name, d in slots.items()})
            for s, ds in enumerate(depths.choices))

    @property
    def widths(self) -> Tuple[Tuple[float, ...], ...]:
        """The classic layout's width choices per width slot."""
        return self._by_name['widths'].choices if 'widths' in self._by_name else ()

    @property
    def kernel_slots(self) -> Tuple[Tuple[int, ...], ...]:
        """The classic layout's kernel choices per block slot."""
        return self._by_name['kernels'].choices if 'kernels' in self._by_name else ()

    @property
    def expand_slots(self) -> Tuple[Tuple[float, ...], ...]:
        """The classic layout's expand choices per block slot."""
        return self._by_name['expands'].choices if 'expands' in self._by_name else ()

    # --- positions ----------------------------------------------------------------------------------------------
    def active(self, subnet: Subnet, name: str) -> List[int]:
        """The positions of dimension ``name`` that ``subnet`` uses: a block slot is used where its stage's depth
        exceeds its index; every position of another scope is used."""
        d = self[name]
        if d.scope != 'block':
            return list(range(len(d.choices)))
        depths = subnet[DEPTHS]
        return [p for p, (s, b) in enumerate(zip(d.stages, d.blocks)) if b < depths[s]]

    # --- size and sampling --------------------------------------------------------------------------------------
    def size(self) -> int:
        """Number of distinct subnets in the space (an exact, possibly very large, integer; constraints are not
        counted out)."""
        total = 1
        blocks: Dict[Tuple[int, int], int] = {}
        for d in self._dimensions:
            if d.scope == 'block':
                for p, owner in enumerate(zip(d.stages, d.blocks)):
                    blocks[owner] = blocks.get(owner, 1) * len(d.choices[p])
            elif d.name != DEPTHS:
                for c in d.choices:
                    total *= len(c)
        depths = self._by_name.get(DEPTHS)
        for s, ds in enumerate(depths.choices if depths is not None else ()):
            total *= sum(math.prod(blocks.get((s, b), 1) for b in range(depth)) for depth in ds)
        return total

    def __len__(self) -> int:
        return self.size()

    def _build(self, pick: Any) -> Subnet:
        return Subnet({d.name: pick(d.choices[0]) if d.scalar else [pick(c) for c in d.choices]
                       for d in self._dimensions})

    def max(self) -> Subnet:
        """The largest subnet: every choice at its maximum."""
        return self._build(lambda c: c[-1])

    def min(self) -> Subnet:
        """The smallest subnet: every choice at its minimum."""
        return self._build(lambda c: c[0])

    def mid(self) -> Subnet:
        """A middle subnet: every choice at its middle index (rounded up)."""
        subnet = self._build(lambda c: c[len(c) // 2])
        if self._broken(subnet):
            raise ValueError(f'The mid subnet breaks the constraint {self._broken(subnet)}')
        return subnet

    def sample(self, seed: RandomLike = None) -> Subnet:
        """Draw a subnet uniformly per choice (redrawn until it meets the constraints).

        Args:
            seed: An int seed (deterministic), a ``random.Random``, a ``numpy.random.Generator`` or None (fresh
                entropy).
        """
        if isinstance(seed, (random.Random, np.random.Generator)):
            rng = seed
        elif seed is None or isinstance(seed, int):
            rng = random.Random(seed)
        else:
            raise ValueError(
                f'seed must be None, an int, a random.Random or a numpy Generator, got {type(seed).__name__}')
        for _ in range(1000):
            subnet = self._build(lambda c: _pick(rng, c))
            if not self._constraints or not self._broken(subnet):
                return subnet
        raise ValueError(f'1000 random subnets in a row broke the constraints {[str(c) for c in self._constraints]}')

    def restrict(self, levels: Mapping[str, Level]) -> 'SearchSpace':
        """The part of the space a training stage samples from: a dimension named in ``levels`` (by label or name)
        keeps ``'all'`` its choices or its ``n`` largest; every other one keeps only its largest."""
        keep = {self.by_label(k).name: v for k, v in levels.items() if self._find(k) is not None}
        return SearchSpace([replace(d, choices=tuple(_top(c, keep.get(d.name)) for c in d.choices))
                            for d in self._dimensions], self._constraints)

    def _find(self, key: str) -> Optional[Dimension]:
        return next((d for d in self._dimensions if key in (d.label, d.name)), None)

    def corner(self, smallest: Sequence[str] = ()) -> Subnet:
        """The subnet with the dimensions named in ``smallest`` at their smallest choices and every other one at its
        largest."""
        low = {self.by_label(k).name for k in smallest}
        return Subnet({d.name: (d.choices[0][0] if d.name in low else d.choices[0][-1]) if d.scalar else
                       [c[0] if d.name in low else c[-1] for c in d.choices] for d in self._dimensions})

    # --- validation ---------------------------------------------------------------------------------------------
    def validate(self, subnet: SubnetLike) -> Subnet:
        """Check that ``subnet`` lies in this space and return it as a ``Subnet`` with the space's dimensions in
        order and each value of its declared kind.

        Raises:
            ValueError: Naming the dimension, the position and the allowed values of the first offending entry.
        """
        subnet = Subnet.parse(subnet)
        unknown = [n for n in subnet.names if n not in self._by_name and n != RESOLUTION]
        if unknown:
            raise ValueError(f'Subnet has values for {unknown}, which this space does not have; its dimensions are '
                             f'{list(self._by_name)}')
        values: Dict[str, Any] = {}
        for d in self._dimensions:
            value = subnet.get(d.name)
            if value is None:
                if d.name == RESOLUTION:  # a subnet may leave the input size to the model
                    continue
                raise ValueError(f'Subnet has no {d.name!r}; this space needs '
                                 f'{"one value" if d.scalar else f"{len(d.choices)} values"} for it')
            if d.scalar:
                if isinstance(value, tuple):
                    raise ValueError(f'Subnet.{d.name} is one number, got a list {list(value)}')
                value = (value,)
            elif not isinstance(value, tuple):
                raise ValueError(f'Subnet.{d.name} is a list of {len(d.choices)} values, got {value!r}')
            if len(value) != len(d.choices):
                what = {'stage': 'stages', 'block': 'block slots'}.get(d.scope, 'positions')
                raise ValueError(f'Subnet.{d.name} has {len(value)} entries, but the space has {len(d.choices)} '
                                 f'{what}')
            for p, (v, allowed) in enumerate(zip(value, d.choices)):
                if v not in allowed:
                    extra = f' (max {allowed[-1]})' if d.name == DEPTHS else ''
                    raise ValueError(f'Subnet.{d.where(None if d.scalar else p)} = {v} is not allowed: allowed '
                                     f'{_describe_choices(allowed)}{extra}')
            value = tuple(int(v) if d.integer else float(v) for v in value)
            values[d.name] = value[0] if d.scalar else value
        if RESOLUTION not in values and subnet.resolution is not None:  # a space without resolutions takes any
            values[RESOLUTION] = _as_int(subnet.resolution, 'Subnet.resolution')
        out = Subnet(values)
        broken = self._broken(out)
        if broken:
            raise ValueError(f'Subnet breaks the constraint {broken}')
        return out

    def _broken(self, subnet: Subnet) -> Optional[str]:
        """The first constraint ``subnet`` breaks, with the values that break it, or None."""
        for c in self._constraints:
            lhs, rhs = self[c.lhs], self[c.rhs]
            a, b = subnet.get(c.lhs), subnet.get(c.rhs)
            a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
            for i, j in _constraint_pairs(lhs, rhs):
                if not c.holds(a[i], b[j]):
                    return f'{c} ({lhs.where(None if lhs.scalar else i)} = {a[i]}, ' \
                           f'{rhs.where(None if rhs.scalar else j)} = {b[j]})'
        return None

    def resolve(self, value: Union[str, SubnetLike]) -> Subnet:
        """Read a subnet given as ``'max'``, ``'min'``, a ``Subnet``, a dict or a JSON file path, and validate it."""
        if isinstance(value, str) and value in ('max', 'min'):
            return self.max() if value == 'max' else self.min()
        if isinstance(value, (str, os.PathLike)):
            return self.validate(self.resolve_path(value))
        return self.validate(value)

    @staticmethod
    def resolve_path(value: Union[str, os.PathLike]) -> Union[str, os.PathLike]:
        """``value`` if it names a file.

        Raises:
            ValueError: Saying which forms a subnet may take, if there is no such file.
        """
        if not os.path.isfile(value):
            raise ValueError(
                f"subnet={os.fspath(value)!r}: expected 'max', 'min', a Subnet, a dict or the path of a subnet JSON "
                f"file (no such file)")
        return value

    def __contains__(self, subnet: object) -> bool:
        try:
            self.validate(subnet)  # type: ignore[arg-type]
        except ValueError:
            return False
        return True

    # --- integer encoding ---------------------------------------------------------------------------------------
    @functools.cached_property
    def genes(self) -> Tuple[Gene, ...]:
        """Every position of every dimension, in declaration order (single-choice positions included)."""
        return tuple(Gene(d.name, None if d.scalar else p, c) for d in self._dimensions
                     for p, c in enumerate(d.choices))

    @functools.cached_property
    def gene_groups(self) -> np.ndarray:
        """Mutation group of each gene, shape ``(len(genes),)``: the block-scoped genes of one block slot share one
        (OFA's evolution redraws a block's kernel and expand together), every other gene is a group of its own."""
        owners: Dict[Tuple[Any, ...], int] = {}
        groups = []
        for g in self.genes:
            d = self._by_name[g.field]
            key = ('block',) + d.owner(g.index) if d.scope == 'block' else (g.field, g.index)
            groups.append(owners.setdefault(key, len(owners)))
        return np.array(groups, dtype=np.int64)

    def gene_index(self, field_name: str, index: Optional[int] = None) -> int:
        """Position of gene ``field_name[index]`` (``index`` None for a scalar) in :attr:`genes`."""
        return self._gene_positions[(field_name, index)]

    def genes_of(self, name: str) -> List[int]:
        """Positions in :attr:`genes` of every gene of dimension ``name``."""
        return [i for i, g in enumerate(self.genes) if g.field == name]

    @functools.cached_property
    def _gene_positions(self) -> Dict[Tuple[str, Optional[int]], int]:
        return {(g.field, g.index): i for i, g in enumerate(self.genes)}

    @functools.cached_property
    def choice_counts(self) -> np.ndarray:
        """Number of choices of each gene, shape ``(len(genes),)``."""
        return np.array([len(g.choices) for g in self.genes], dtype=np.int64)

    def encode(self, subnets: Union[SubnetLike, Sequence[SubnetLike]]) -> np.ndarray:
        """Choice indices of one subnet (shape ``(G,)``) or of many (shape ``(N, G)``).

        Raises:
            ValueError: If a subnet is not in the space (or has no resolution while the space has some).
        """
        single = isinstance(subnets, (Subnet, Mapping, str, os.PathLike))
        rows = []
        for subnet in ([subnets] if single else subnets):
            subnet = self.validate(subnet)
            if self.resolutions and subnet.resolution is None:
                raise ValueError('A subnet without a resolution cannot be encoded in a space with resolutions')
            values = [v for d in self._dimensions for v in ((subnet[d.name],) if d.scalar else subnet[d.name])]
            rows.append([g.choices.index(v) for g, v in zip(self.genes, values)])
        codes = np.array(rows, dtype=np.int64).reshape(len(rows), len(self.genes))
        return codes[0] if single else codes

    def decode(self, codes: np.ndarray) -> Union[Subnet, List[Subnet]]:
        """Inverse of :meth:`encode`: a ``Subnet`` for shape ``(G,)``, a list for shape ``(N, G)``.

        Raises:
            ValueError: If the array does not have one in-range index per gene.
        """
        codes = np.asarray(codes)
        single = codes.ndim == 1
        codes = np.atleast_2d(codes)
        if codes.ndim != 2 or codes.shape[1] != len(self.genes):
            raise ValueError(f'Expected codes of shape (N, {len(self.genes)}), got {tuple(np.shape(codes))}')
        if (codes < 0).any() or (codes >= self.choice_counts).any():
            raise ValueError('Codes hold a choice index outside its gene\'s choices')
        out = []
        for row in codes.tolist():
            values: Dict[str, Any] = {}
            pos = 0
            for d in self._dimensions:
                picked = [c[i] for c, i in zip(d.choices, row[pos:pos + len(d.choices)])]
                values[d.name] = picked[0] if d.scalar else picked
                pos += len(d.choices)
            out.append(Subnet(values))
        return out[0] if single else out

    def feasible(self, codes: np.ndarray) -> np.ndarray:
        """Whether each encoded subnet (``(N, G)`` codes) meets the constraints: a bool array of shape ``(N,)``."""
        codes = np.atleast_2d(codes)
        ok = np.ones(len(codes), dtype=bool)
        for table, gl, gr in self._constraint_tables:
            ok &= table[codes[:, gl], codes[:, gr]]
        return ok

    @functools.cached_property
    def _constraint_tables(self) -> List[Tuple[np.ndarray, int, int]]:
        tables = []
        for c in self._constraints:
            lhs, rhs = self[c.lhs], self[c.rhs]
            left, right = self.genes_of(lhs.name), self.genes_of(rhs.name)
            for i, j in _constraint_pairs(lhs, rhs):
                table = np.array([[c.holds(a, b) for b in rhs.choices[j]] for a in lhs.choices[i]], dtype=bool)
                tables.append((table, left[i], right[j]))
        return tables

    def replace_resolutions(self, resolutions: Sequence[int]) -> 'SearchSpace':
        """The same space with other resolutions (none: without a resolution dimension)."""
        old = self._by_name.get(RESOLUTION)
        dims = [d for d in self._dimensions if d.name != RESOLUTION]
        if resolutions:
            new = Dimension.network(RESOLUTION, sorted(set(resolutions)), shrink_order=0)
            if old is not None:
                new = replace(old, choices=new.choices)
            dims.append(new)
        return SearchSpace(dims, self._constraints)

    # --- files --------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-able description of the space (``version`` :data:`SPACE_FORMAT`)."""
        d: Dict[str, Any] = dict(version=SPACE_FORMAT, dimensions=[dim.to_dict() for dim in self._dimensions])
        if self._constraints:
            d['constraints'] = [[c.lhs, c.op, c.rhs] for c in self._constraints]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'SearchSpace':
        """Inverse of :meth:`to_dict`; also reads 0.2.0's classic form (``stages``, ``widths``, ``resolutions``).

        Raises:
            ValueError: On a dict of a newer format, or malformed declarations.
        """
        if 'stages' in d and 'version' not in d:
            return cls.from_stages(tuple(StageChoices(**s) for s in d['stages']),
                                   tuple(tuple(w) for w in d.get('widths', ())), tuple(d.get('resolutions', ())))
        version = d.get('version')
        if version != SPACE_FORMAT:
            raise ValueError(f'Search space format {version!r} is not one this release reads ({SPACE_FORMAT}, or '
                             f'0.2.0\'s classic form): upgrade ofa-timm to read it')
        return cls([Dimension.from_dict(x) for x in d['dimensions']],
                   [Constraint(*c) for c in d.get('constraints', ())])


def _constraint_pairs(lhs: Dimension, rhs: Dimension) -> List[Tuple[int, int]]:
    """Positions of ``lhs`` and ``rhs`` a constraint relates: position by position where the two line up, else all
    pairs."""
    if lhs.scope == rhs.scope and len(lhs.choices) == len(rhs.choices) and not lhs.scalar:
        return [(i, i) for i in range(len(lhs.choices))]
    return [(i, j) for i in range(len(lhs.choices)) for j in range(len(rhs.choices))]


@dataclass(frozen=True)
class StageChoices:
    """Allowed choices of one stage in the classic layout (:meth:`SearchSpace.from_stages`).

    Args:
        depths: Allowed numbers of active blocks. The stage owns ``max(depths)`` block slots.
        kernels: Allowed kernel sizes per block slot, or empty if the stage has no elastic kernel.
        expands: Allowed expand ratios per block slot, or empty if the stage has no elastic expansion.
    """
    depths: Tuple[int, ...]
    kernels: Tuple[Tuple[int, ...], ...] = ()
    expands: Tuple[Tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        depths = tuple(sorted(set(_as_int(d, 'StageChoices.depths') for d in self.depths)))
        if not depths or depths[0] < 0:
            raise ValueError(f'StageChoices.depths must be non-empty and >= 0, got {self.depths}')
        kernels = tuple(tuple(sorted(set(_as_int(k, 'kernel') for k in ks))) for ks in self.kernels)
        expands = tuple(tuple(sorted(set(float(_number(e, 'expand')) for e in es))) for es in self.expands)
        for name, slots in (('kernels', kernels), ('expands', expands)):
            if slots and len(slots) != depths[-1]:
                raise ValueError(
                    f'StageChoices.{name} has {len(slots)} slots, but max depth {depths[-1]} needs {depths[-1]}')
            if any(not c for c in slots):
                raise ValueError(f'StageChoices.{name} has a slot without choices')
        object.__setattr__(self, 'depths', depths)
        object.__setattr__(self, 'kernels', kernels)
        object.__setattr__(self, 'expands', expands)

    @property
    def max_depth(self) -> int:
        return self.depths[-1]
