"""Subnet specifications and the search spaces they live in.

A :class:`Subnet` is an immutable, hashable description of one architecture inside an elastic supernet: depth per
stage, kernel size and expand ratio per block slot, width multipliers per width slot and the input resolution.
A :class:`SearchSpace` holds the allowed choices for each of those positions, samples from them, validates subnets
against them and encodes them as integer arrays (one :class:`Gene` per position) for vectorised search. Both are
family agnostic: every supernet family describes itself with the same types, and reads the reference
implementation's subnet dicts itself (``ElasticSupernet.resolve``).

Block slots are numbered stage by stage. A stage with a maximum depth of 4 owns 4 consecutive slots in
``Subnet.kernels`` / ``Subnet.expands`` whether or not the subnet activates all of them; values in inactive slots
must still be valid choices, which keeps the reference implementation's fixed-length encoding usable as is.
"""
import functools
import json
import math
import operator
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._io import write_text_atomic

__all__ = ['Subnet', 'StageChoices', 'SearchSpace', 'Gene', 'SubnetLike', 'RandomLike', 'OFA_RESOLUTIONS']

# OFA's elastic resolutions.
OFA_RESOLUTIONS: Tuple[int, ...] = tuple(range(128, 225, 4))

_OUR_KEYS = ('resolution', 'depths', 'kernels', 'expands', 'widths')
# Keys of the reference implementation's subnet dicts; a supernet reads those (ElasticSupernet.resolve).
_REFERENCE_KEYS = frozenset({'ks', 'e', 'd', 'r', 'w', 'wid'})

RandomLike = Union[None, int, random.Random, np.random.Generator]


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f'{name} must be an integer, got bool {value!r}')
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f'{name} must be an integer, got {type(value).__name__} {value!r}') from None


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f'{name} must be a number, got {type(value).__name__} {value!r}')
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f'{name} must be a positive finite number, got {value!r}')
    return value


def _as_sequence(value: Any, name: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f'{name} must be a list, got {type(value).__name__} {value!r}')
    return value


@dataclass(frozen=True)
class Subnet:
    """One architecture of an elastic supernet.

    Args:
        depths: Number of active blocks per elastic stage.
        kernels: Depthwise kernel size per block slot (empty for families without elastic kernels).
        expands: Expand ratio per block slot (empty for families without elastic expansion).
        widths: Width multiplier per width slot (empty for families without elastic width).
        resolution: Input resolution, or None where the subnet does not fix one.
    """
    depths: Tuple[int, ...]
    kernels: Tuple[int, ...] = ()
    expands: Tuple[float, ...] = ()
    widths: Tuple[float, ...] = ()
    resolution: Optional[int] = None

    def __post_init__(self) -> None:
        # Normalise to tuples of plain Python numbers so equal specs hash equally, whatever container came in.
        depths = tuple(_as_int(v, f'Subnet.depths[{i}]') for i, v in enumerate(_as_sequence(self.depths, 'depths')))
        for i, d in enumerate(depths):
            if d < 0:
                raise ValueError(f'Subnet.depths[{i}] = {d} must be >= 0')
        kernels = tuple(
            _as_int(v, f'Subnet.kernels[{i}]') for i, v in enumerate(_as_sequence(self.kernels, 'kernels')))
        for i, k in enumerate(kernels):
            if k < 1 or k % 2 == 0:
                raise ValueError(f'Subnet.kernels[{i}] = {k} must be a positive odd integer')
        expands = tuple(
            _as_float(v, f'Subnet.expands[{i}]') for i, v in enumerate(_as_sequence(self.expands, 'expands')))
        widths = tuple(
            _as_float(v, f'Subnet.widths[{i}]') for i, v in enumerate(_as_sequence(self.widths, 'widths')))
        resolution = self.resolution
        if resolution is not None:
            resolution = _as_int(resolution, 'Subnet.resolution')
            if resolution <= 0:
                raise ValueError(f'Subnet.resolution = {resolution} must be positive')
        object.__setattr__(self, 'depths', depths)
        object.__setattr__(self, 'kernels', kernels)
        object.__setattr__(self, 'expands', expands)
        object.__setattr__(self, 'widths', widths)
        object.__setattr__(self, 'resolution', resolution)

    def replace(self, **changes: Any) -> 'Subnet':
        """Return a copy with some fields replaced."""
        fields = dict(
            depths=self.depths, kernels=self.kernels, expands=self.expands, widths=self.widths,
            resolution=self.resolution)
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f'Unknown Subnet field(s) {sorted(unknown)}; allowed: {sorted(fields)}')
        fields.update(changes)
        return Subnet(**fields)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict with keys ``resolution``, ``depths``, ``kernels``, ``expands`` and ``widths``.

        Keys of dimensions the subnet does not use (no widths, no resolution) are left out.
        """
        out: Dict[str, Any] = {}
        if self.resolution is not None:
            out['resolution'] = self.resolution
        out['depths'] = list(self.depths)
        out['kernels'] = list(self.kernels)
        out['expands'] = list(self.expands)
        if self.widths:
            out['widths'] = list(self.widths)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'Subnet':
        """Read a subnet dict of this project's form (:meth:`to_dict`).

        The reference OFA implementation's forms (``{'ks', 'e', 'd'}``, ``{'d', 'e', 'w'}``) depend on the supernet
        family; read them with ``supernet.resolve(d)`` or ``timm.create_model(name, subnet=d)``.

        Raises:
            ValueError: On unknown keys or malformed values.
        """
        if isinstance(d, Subnet):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f'A subnet dict must be a mapping, got {type(d).__name__}')
        keys = set(d)
        if keys <= set(_OUR_KEYS):
            if 'depths' not in keys:
                raise ValueError(f"Subnet dict is missing 'depths'; got keys {sorted(keys)}")
            return cls(
                depths=d['depths'], kernels=d.get('kernels', ()), expands=d.get('expands', ()),
                widths=d.get('widths', ()), resolution=d.get('resolution'))
        if keys <= _REFERENCE_KEYS:
            raise ValueError(
                f'Subnet dict keys {sorted(keys)} are the reference implementation\'s form, which depends on the '
                f'supernet family: read it with supernet.resolve(d) or timm.create_model(name, subnet=d)')
        raise ValueError(
            f'Unknown subnet dict keys {sorted(keys)}. Allowed: {list(_OUR_KEYS)} (ofa_timm form), or the reference '
            f"implementation's forms {['ks', 'e', 'd', 'r']} / {['d', 'e', 'w', 'r']} through a supernet")

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


@dataclass(frozen=True)
class StageChoices:
    """Allowed choices of one elastic stage.

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
        expands = tuple(tuple(sorted(set(_as_float(e, 'expand') for e in es))) for es in self.expands)
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

    def size(self) -> int:
        """Number of distinct architectures of this stage (inactive slots do not count)."""
        total = 0
        for d in self.depths:
            n = 1
            for i in range(d):
                n *= len(self.kernels[i]) if self.kernels else 1
                n *= len(self.expands[i]) if self.expands else 1
            total += n
        return total


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


@dataclass(frozen=True)
class Gene:
    """One position of a subnet and its choices: ``depths[i]``, ``kernels[i]``, ``expands[i]``, ``widths[i]`` or
    ``resolution``. A subnet is encoded as the index of its value in each gene's choices.

    Args:
        field: The ``Subnet`` field.
        index: Position in that field (None for ``resolution``).
        choices: Allowed values, ascending.
    """
    field: str
    index: Optional[int]
    choices: Tuple[Any, ...]

    @property
    def name(self) -> str:
        return self.field if self.index is None else f'{self.field}[{self.index}]'


@dataclass(frozen=True)
class SearchSpace:
    """The choices of an elastic supernet.

    Args:
        stages: Choices per elastic stage.
        widths: Allowed width multipliers per width slot (empty if width is not elastic).
        resolutions: Allowed input resolutions (empty if resolution is not part of the space).
    """
    stages: Tuple[StageChoices, ...]
    widths: Tuple[Tuple[float, ...], ...] = ()
    resolutions: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        if not all(isinstance(s, StageChoices) for s in stages):
            raise ValueError('SearchSpace.stages must be StageChoices')
        widths = tuple(tuple(sorted(set(_as_float(w, 'width') for w in ws))) for ws in self.widths)
        if any(not ws for ws in widths):
            raise ValueError('SearchSpace.widths has a slot without choices')
        resolutions = tuple(sorted(set(_as_int(r, 'resolution') for r in self.resolutions)))
        if resolutions and resolutions[0] <= 0:
            raise ValueError(f'SearchSpace.resolutions must be positive, got {resolutions}')
        object.__setattr__(self, 'stages', stages)
        object.__setattr__(self, 'widths', widths)
        object.__setattr__(self, 'resolutions', resolutions)

    # --- layout -------------------------------------------------------------------------------------------------
    @property
    def kernel_slots(self) -> Tuple[Tuple[int, ...], ...]:
        """Kernel choices of every block slot, in ``Subnet.kernels`` order."""
        return tuple(ks for s in self.stages for ks in s.kernels)

    @property
    def expand_slots(self) -> Tuple[Tuple[float, ...], ...]:
        """Expand choices of every block slot, in ``Subnet.expands`` order."""
        return tuple(es for s in self.stages for es in s.expands)

    def slot_owner(self, field_name: str, index: int) -> Tuple[int, int]:
        """The (stage, block) a kernel or expand slot index belongs to."""
        for stage_idx, stage in enumerate(self.stages):
            n = len(getattr(stage, field_name))
            if index < n:
                return stage_idx, index
            index -= n
        raise IndexError(index)

    def active_slots(self, subnet: Subnet, field_name: str) -> Iterator[int]:
        """Indices of the ``kernels``/``expands`` slots that ``subnet``'s depths activate."""
        offset = 0
        for stage, depth in zip(self.stages, subnet.depths):
            n = len(getattr(stage, field_name))
            if n:
                yield from range(offset, offset + depth)
            offset += n

    # --- size and sampling --------------------------------------------------------------------------------------
    def size(self) -> int:
        """Number of distinct subnets in the space (an exact, possibly very large, integer)."""
        total = 1
        for s in self.stages:
            total *= s.size()
        for ws in self.widths:
            total *= len(ws)
        return total * max(1, len(self.resolutions))

    def __len__(self) -> int:
        return self.size()

    def _build(self, pick: Any) -> Subnet:
        return Subnet(
            depths=[pick(s.depths) for s in self.stages],
            kernels=[pick(ks) for ks in self.kernel_slots],
            expands=[pick(es) for es in self.expand_slots],
            widths=[pick(ws) for ws in self.widths],
            resolution=pick(self.resolutions) if self.resolutions else None,
        )

    def max(self) -> Subnet:
        """The largest subnet: every choice at its maximum."""
        return self._build(lambda c: c[-1])

    def min(self) -> Subnet:
        """The smallest subnet: every choice at its minimum."""
        return self._build(lambda c: c[0])

    def mid(self) -> Subnet:
        """A middle subnet: every choice at its middle index (rounded up)."""
        return self._build(lambda c: c[len(c) // 2])

    def sample(self, seed: RandomLike = None) -> Subnet:
        """Draw a subnet uniformly per choice.

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
        return self._build(lambda c: _pick(rng, c))

    # --- validation ---------------------------------------------------------------------------------------------
    def validate(self, subnet: 'SubnetLike') -> Subnet:
        """Check that ``subnet`` lies in this space and return it as a ``Subnet``.

        Raises:
            ValueError: Naming the field, the index and the allowed values of the first offending entry.
        """
        subnet = Subnet.parse(subnet)
        n_stages = len(self.stages)
        if len(subnet.depths) != n_stages:
            raise ValueError(f'Subnet.depths has {len(subnet.depths)} entries, but the space has {n_stages} stages')
        for i, (d, stage) in enumerate(zip(subnet.depths, self.stages)):
            if d not in stage.depths:
                raise ValueError(
                    f'Subnet.depths[{i}] = {d} is not allowed for stage {i}: allowed {list(stage.depths)} '
                    f'(max {stage.max_depth})')
        for name, slots in (('kernels', self.kernel_slots), ('expands', self.expand_slots)):
            values = getattr(subnet, name)
            if len(values) != len(slots):
                raise ValueError(
                    f'Subnet.{name} has {len(values)} entries, but the space has {len(slots)} block slots')
            for i, (v, allowed) in enumerate(zip(values, slots)):
                if v not in allowed:
                    stage, block = self.slot_owner(name, i)
                    raise ValueError(
                        f'Subnet.{name}[{i}] = {v} is not allowed for stage {stage} block {block}: '
                        f'allowed {list(allowed)}')
        if len(subnet.widths) != len(self.widths):
            raise ValueError(f'Subnet.widths has {len(subnet.widths)} entries, but the space has {len(self.widths)}')
        for i, (w, allowed) in enumerate(zip(subnet.widths, self.widths)):
            if w not in allowed:
                raise ValueError(f'Subnet.widths[{i}] = {w} is not allowed: allowed {list(allowed)}')
        if subnet.resolution is not None and self.resolutions and subnet.resolution not in self.resolutions:
            raise ValueError(
                f'Subnet.resolution = {subnet.resolution} is not allowed: allowed '
                f'{_describe_choices(self.resolutions)}')
        return subnet

    def resolve(self, value: Union[str, 'SubnetLike']) -> Subnet:
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
        """Every position of a subnet, in ``Subnet`` field order (single-choice positions included)."""
        genes = [Gene('depths', i, s.depths) for i, s in enumerate(self.stages)]
        genes += [Gene('kernels', i, c) for i, c in enumerate(self.kernel_slots)]
        genes += [Gene('expands', i, c) for i, c in enumerate(self.expand_slots)]
        genes += [Gene('widths', i, c) for i, c in enumerate(self.widths)]
        if self.resolutions:
            genes.append(Gene('resolution', None, self.resolutions))
        return tuple(genes)

    @functools.cached_property
    def gene_groups(self) -> np.ndarray:
        """Mutation group of each gene, shape ``(len(genes),)``: a block slot's kernel and expand genes share one
        (OFA's evolution redraws a block's kernel and expand together), every other gene is a group of its own."""
        owners: Dict[Tuple[Any, ...], int] = {}
        groups = []
        for g in self.genes:
            key = ('block',) + self.slot_owner(g.field, g.index) if g.field in ('kernels', 'expands') else (
                g.field, g.index)
            groups.append(owners.setdefault(key, len(owners)))
        return np.array(groups, dtype=np.int64)

    def gene_index(self, field_name: str, index: Optional[int] = None) -> int:
        """Position of gene ``field_name[index]`` (or ``resolution``) in :attr:`genes`."""
        return self._gene_positions[(field_name, index)]

    @functools.cached_property
    def _gene_positions(self) -> Dict[Tuple[str, Optional[int]], int]:
        return {(g.field, g.index): i for i, g in enumerate(self.genes)}

    @functools.cached_property
    def choice_counts(self) -> np.ndarray:
        """Number of choices of each gene, shape ``(len(genes),)``."""
        return np.array([len(g.choices) for g in self.genes], dtype=np.int64)

    def encode(self, subnets: Union['SubnetLike', Sequence['SubnetLike']]) -> np.ndarray:
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
            values = [*subnet.depths, *subnet.kernels, *subnet.expands, *subnet.widths]
            if self.resolutions:
                values.append(subnet.resolution)
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
        counts = {f: sum(1 for g in self.genes if g.field == f) for f in _OUR_KEYS}
        out = []
        for row in codes.tolist():
            values = [g.choices[i] for g, i in zip(self.genes, row)]
            fields: Dict[str, Any] = {}
            pos = 0
            for name in ('depths', 'kernels', 'expands', 'widths'):
                fields[name] = values[pos:pos + counts[name]]
                pos += counts[name]
            fields['resolution'] = values[pos] if self.resolutions else None
            out.append(Subnet(**fields))
        return out[0] if single else out

    def replace_resolutions(self, resolutions: Sequence[int]) -> 'SearchSpace':
        """The same space with other resolutions."""
        return SearchSpace(self.stages, self.widths, tuple(resolutions))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able description of the space."""
        return dict(
            stages=[
                dict(depths=list(s.depths), kernels=[list(k) for k in s.kernels],
                     expands=[list(e) for e in s.expands])
                for s in self.stages],
            widths=[list(w) for w in self.widths],
            resolutions=list(self.resolutions),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'SearchSpace':
        """Inverse of :meth:`to_dict`."""
        return cls(
            stages=tuple(StageChoices(**s) for s in d['stages']),
            widths=tuple(tuple(w) for w in d.get('widths', ())),
            resolutions=tuple(d.get('resolutions', ())),
        )
