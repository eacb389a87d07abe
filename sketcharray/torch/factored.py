"""Factored per-layer sketches: every layer's gradient sketched from one batched backward (docs/factored.md).

For a weight W used as ``y_t = W a_t`` over the tokens t of one example, the
example's gradient is ``G = sum_t delta_t a_t^T`` (``delta_t = dl/dy_t``), so
with factor sketches ``P_r`` (rows) and ``P_c`` (columns)

    (P_r kron P_c) vec(G) = vec( sum_t (P_r delta_t) (P_c a_t)^T )      (row-major vec)

needs only the activations and output-gradients of a batched forward and
backward: no per-example gradient and no weight gradient is ever formed.
Every 2-D weight of a ``Linear``, a transformers ``Conv1D`` (``y = a W``: rows
are inputs) or an ``Embedding`` (row ``id_t`` gets ``delta_t``: the row factor
contributes its column ``id_t``) is such a *block*; biases and LayerNorm
parameters are exact per-example sums (``sum_t delta_t``, ``sum_t delta_t *
a_hat_t``) pooled into one *small* vector that one whole-vector sketch maps
to its share of D.  The split of D and every factor's shape and seed form
the layout, which is part of the sketch's spec (its identity for provenance).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..sketches import make_sketch
from ..sketches.registry import describe_spec
from .params import ParamSet

#: factor families a factored sketch may draw P_r, P_c from (the small vector uses afjl, or dense for dense)
FACTORS = ("afjl", "qk", "dense")
#: how D is split over the blocks (docs/factored.md, "Choosing D per layer"); recorded in the spec
SPLIT_RULE = "sqrt-size-pow2"
#: a factor with at most this many entries is kept as a matrix (made once from its adjoint), so projecting a
#: layer's tokens is one matrix product (MiniLM's largest, the vocabulary's 32 x 30522, is 4 MB); larger
#: factors are applied as transforms and give an embedding's columns by sketching one-hot rows
TABLE_LIMIT = 1 << 24


#: factor matrices are shared by every sketch of one process (a sketch is rebuilt from its spec for each call and
#: in each task): the most recent ones are kept up to this many entries in all (256 MB of float32)
SHARED_TABLE_ENTRIES = 1 << 26
_tables: dict = {}
_tables_lock = threading.Lock()


class FactoredSketchError(ValueError):
    """A model, parameter selection or sketch spec a factored sketch cannot serve; the message names it."""


# ------------------------------------------------------------------ the layout
@dataclass(frozen=True)
class Block:
    """One 2-D weight: ``rows x cols`` sketched to ``d_rows x d_cols`` coordinates at ``offset``."""

    param: str
    rows: int
    cols: int
    d_rows: int
    d_cols: int
    offset: int
    row_seed: int
    col_seed: int

    @property
    def size(self) -> int:
        return self.d_rows * self.d_cols

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SmallBlock:
    """The pooled per-example gradients of biases and normalisation parameters, sketched whole."""

    params: tuple[str, ...]
    n_in: int
    n_out: int
    offset: int
    seed: int
    method: str

    def to_dict(self) -> dict:
        return {**self.__dict__, "params": list(self.params)}


def _seed(seed: int, index: int, role: str) -> int:
    digest = hashlib.sha256(f"sketcharray-factored:{seed}:{index}:{role}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def split_budget(blocks: list[tuple[str, int, int]], n_small: int, n_out: int, *,
                 pow2: bool = False) -> tuple[list[tuple[int, int]], int]:
    """D per block by the rule ``SPLIT_RULE``: ``[(d_rows, d_cols)]`` for the weights and the small vector's share.

    Each block's share is ``t_b = D sqrt(n_b) / sum sqrt(n)`` (``n_b`` its
    entries, the small vector one block).  A weight gets the power of two
    ``d_b <= t_b`` (at least 1, at most what its sides allow), as
    ``d_rows x d_cols`` powers of two with the larger side on the larger
    dimension; the small vector's target is ``round(t_small)`` (at least 1,
    at most its length).  Weights are then doubled, the one furthest below
    its share first, while the rest beyond the small target allows it, and
    further while the small vector could not take the rest; the small vector
    takes what is left.  When no such split sums to D, the split of the
    nearest smaller D that has one is kept and the rest goes to one weight
    whose side ``d_cols`` then need not be a power of two (the most balanced
    such choice); with ``pow2`` (qk factors, whose output size must factor
    over their blocks) that is refused, naming the nearest D that splits.
    The sum is exactly D.
    """
    if not blocks:
        raise FactoredSketchError("a factored sketch needs at least one weight of a Linear, Conv1D or Embedding "
                                  "among the selected parameters")
    caps = [_pow2_floor(r) * _pow2_floor(c) for _, r, c in blocks]
    if n_out < len(blocks) + (1 if n_small else 0):
        raise FactoredSketchError(f"n_out={n_out} is smaller than the {len(blocks)} weight block(s)"
                                  f"{' and the small vector' if n_small else ''} it must cover (one coordinate "
                                  "each at least)")
    if n_out > sum(caps) + n_small:
        raise FactoredSketchError(f"n_out={n_out} exceeds what the layers can hold: {sum(caps)} coordinates of "
                                  f"weights (powers of two per side) and {n_small} of small parameters")
    d = _split(blocks, caps, n_small, n_out)
    fixed: dict[int, tuple[int, int]] = {}
    if d is None and pow2:
        near = [x for x in sorted(range(max(1, n_out // 2), 2 * n_out + 1), key=lambda x: (abs(x - n_out), x))
                if x != n_out and _split(blocks, caps, n_small, x) is not None][:2]
        raise FactoredSketchError(f"n_out={n_out} cannot be split over these layers in powers of two per side (qk "
                                  f"factors need them)" + (f"; {' or '.join(map(str, sorted(near)))} works"
                                                           if near else ""))
    if d is None:
        d, fixed = _split_with_rest(blocks, caps, n_small, n_out)
    shapes = []
    for i, ((name, rows, cols), db) in enumerate(zip(blocks, d)):
        if i in fixed:
            shapes.append(fixed[i])
            continue
        big, little = (rows, cols) if rows >= cols else (cols, rows)
        k = db.bit_length() - 1
        d_big = min(_pow2_floor(big), 1 << ((k + 1) // 2))
        d_little = db // d_big
        if d_little > _pow2_floor(little):
            d_little = _pow2_floor(little)
            d_big = db // d_little
        shapes.append((d_big, d_little) if rows >= cols else (d_little, d_big))
    return shapes, n_out - sum(d)


def _split_with_rest(blocks, caps, n_small: int, n_out: int) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """When powers of two cannot sum to n_out: the powers-of-two split of the largest n_out' < n_out that has one,
    and the rest given to one weight as ``d_rows x d_cols`` with d_rows a power of two and d_cols any integer,
    the most balanced choice over the weights and the small vector's possible shares."""
    for base in range(n_out - 1, 0, -1):
        d = _split(blocks, caps, n_small, base)
        if d is not None:
            break
    else:
        d = None
    if d is None:
        raise FactoredSketchError(f"n_out={n_out} cannot be split over these layers")
    small = base - sum(d)
    best = None
    options = range(1, n_small + 1) if n_small else [0]
    for keep in options:
        extra = n_out - sum(d) - keep
        if extra <= 0:
            continue
        for i, (_, rows, cols) in enumerate(blocks):
            total = d[i] + extra
            if total > rows * cols:
                continue
            dr = 1
            while dr * 2 <= rows and total % (dr * 2) == 0:
                dr *= 2
            for r in (dr, *(1 << j for j in range(dr.bit_length() - 1))):
                if total % r == 0 and total // r <= cols:
                    score = (min(r, total // r), -abs(keep - small), -i)
                    if best is None or score > best[0]:
                        best = (score, i, r, total // r)
    if best is None:
        raise FactoredSketchError(f"n_out={n_out} cannot be split over these layers")
    _, i, r, c = best
    d = list(d)
    d[i] = r * c
    return d, {i: (r, c)}


def _split(blocks, caps, n_small: int, n_out: int) -> list[int] | None:
    """The weights' sizes d_b of :func:`split_budget`, or None when no such split sums to n_out."""
    sizes = [r * c for _, r, c in blocks] + ([n_small] if n_small else [])
    total = sum(math.sqrt(s) for s in sizes)
    share = [n_out * math.sqrt(s) / total for s in sizes]
    d = [min(cap, _pow2_floor(t)) for cap, t in zip(caps, share)]
    low = 1 if n_small else 0
    target = min(n_small, max(1, int(round(share[-1])))) if n_small else 0
    for keep in (target, low):  # first leave the small vector its share, then only what it must have
        while True:
            rest = n_out - sum(d) - keep
            growable = [i for i in range(len(d)) if d[i] <= rest and 2 * d[i] <= caps[i]]
            if rest <= 0 or not growable or (keep == low and n_out - sum(d) <= n_small):
                break
            i = max(growable, key=lambda j: (share[j] / d[j], -j))
            d[i] *= 2
    rest = n_out - sum(d)
    return d if low <= rest <= n_small else None


# ------------------------------------------------------------------ model structure
def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = a W + b`` with W of shape (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


#: (module kind, parameter attribute) -> role: "block" (a Kronecker-sketched weight) or "small"
def _role(module: nn.Module, attr: str) -> tuple[str, str] | None:
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        kind = "conv1d" if _is_conv1d(module) else "linear"
        return {"weight": (kind, "block"), "bias": (kind, "small")}.get(attr)
    if isinstance(module, nn.Embedding):
        return ("embedding", "block") if attr == "weight" else None
    if isinstance(module, nn.LayerNorm):
        return ("layernorm", "small") if attr in ("weight", "bias") else None
    return None


SUPPORTED = "Linear, transformers' Conv1D, Embedding (weights and biases) and LayerNorm"


@dataclass
class _Use:
    module: nn.Module
    kind: str
    attrs: dict[str, str]  # parameter attribute -> selected parameter name


def model_uses(model: nn.Module, paramset: ParamSet) -> list[_Use]:
    """The modules that use the selected parameters, each with its kind; refuses what cannot be factored."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise FactoredSketchError(
                f"module {name!r} ({type(m).__name__}) normalises with the statistics of the batch, so one "
                "example's gradient depends on the others: a per-example gradient is not defined; put the model in "
                "eval mode (running statistics) or use a whole-vector sketch")
    by_id = {id(p): n for n, p in model.named_parameters() if n in set(paramset.names)}
    uses, seen, owned = [], set(), set()
    for mname, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen:
            continue
        seen.add(id(m))
        attrs = {}
        for attr, p in m._parameters.items():
            if p is None or id(p) not in by_id:
                continue
            role = _role(m, attr)
            if role is None:
                raise FactoredSketchError(
                    f"parameter {by_id[id(p)]!r} belongs to a {type(m).__name__} ({mname or 'the model'}), which "
                    f"factored sketches do not support (supported: {SUPPORTED}); leave it out with params=... "
                    "or use a whole-vector sketch")
            attrs[attr] = by_id[id(p)]
            owned.add(id(p))
        if attrs:
            uses.append(_Use(m, _role(m, next(iter(attrs)))[0], attrs))
    missing = [n for i, n in by_id.items() if i not in owned]
    if missing:
        raise FactoredSketchError(f"parameter(s) {missing} belong to no module; factored sketches support "
                                  f"{SUPPORTED}")
    return uses


def _roles(uses: list[_Use]) -> dict[str, str]:
    out: dict[str, str] = {}
    for u in uses:
        for attr, name in u.attrs.items():
            role = _role(u.module, attr)[1]
            if out.setdefault(name, role) != role:
                raise FactoredSketchError(f"parameter {name!r} is used both as a weight and as a bias or "
                                          "normalisation parameter; factored sketches cannot combine these uses")
    return out


# ------------------------------------------------------------------ the sketch value
class FactoredSketch:
    """A factored per-layer sketch ``S`` for one parameter selection (build it with :func:`factored_sketch`).

    An immutable value defined by its spec (factor family, D, seed and the
    layout): equal specs give equal sketches in every process.  ``apply`` is
    the explicit reference ``S g`` of flattened gradients (for tests and
    checks); :func:`sketch_batch` computes the same numbers from one batched
    backward without forming ``g``.
    """

    method = "factored"

    def __init__(self, factor: str, n_in: int, n_out: int, seed: int, blocks: tuple[Block, ...],
                 small: SmallBlock | None, param_names: tuple[str, ...], param_sizes: tuple[int, ...]):
        self.factor, self.n_in, self.n_out, self.seed = factor, n_in, n_out, seed
        self.blocks, self.small = tuple(blocks), small
        self.param_names, self.param_sizes = tuple(param_names), tuple(param_sizes)
        self._ops: dict = {}

    # ---------------------------------------------------------------- spec
    @property
    def spec(self) -> dict[str, Any]:
        return {"method": "factored", "factor": self.factor, "n_in": self.n_in, "n_out": self.n_out,
                "seed": self.seed, "rule": SPLIT_RULE,
                "layout": {"blocks": [b.to_dict() for b in self.blocks],
                           "small": None if self.small is None else self.small.to_dict()}}

    def __eq__(self, other) -> bool:
        return isinstance(other, FactoredSketch) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(json.dumps(self.spec, sort_keys=True))

    def __dask_tokenize__(self):
        return ("factored-sketch", json.dumps(self.spec, sort_keys=True))

    def __reduce__(self):
        return _from_state, (self.factor, self.n_in, self.n_out, self.seed, self.blocks, self.small,
                             self.param_names, self.param_sizes)

    def __repr__(self) -> str:
        return (f"FactoredSketch(factor={self.factor!r}, n_in={self.n_in}, n_out={self.n_out}, seed={self.seed}, "
                f"{len(self.blocks)} blocks{'' if self.small is None else f' + {self.small.n_out} small'})")

    def describe(self) -> str:
        return describe_spec(self.spec)

    # ---------------------------------------------------------------- factors
    def row_factor(self, block: Block):
        return self._op(self.factor, block.rows, block.d_rows, block.row_seed)

    def col_factor(self, block: Block):
        return self._op(self.factor, block.cols, block.d_cols, block.col_seed)

    def small_op(self):
        s = self.small
        return None if s is None else self._op(s.method, s.n_in, s.n_out, s.seed)

    def _op(self, method, n_in, n_out, seed):
        key = (method, n_in, n_out, seed)
        op = self._ops.get(key)
        if op is None:
            op = self._ops[key] = make_sketch(method, n_in, n_out, seed=seed)
        return op

    def transposed(self, op, device) -> torch.Tensor | None:
        """``P^T`` of a factor as a ``(n_in x n_out)`` float32 tensor on ``device``, made once with the factor's
        adjoint (``P^T e_j`` is row j of P), or None when it would have more than :data:`TABLE_LIMIT` entries.

        A layer's factor is small (d x width), so a projection is then one
        matrix product instead of a transform per call; the numbers are the
        factor's own, to float32 rounding.
        """
        if op.n_in * op.n_out > TABLE_LIMIT:
            return None
        key = (op.method, op.n_in, op.n_out, op.seed, str(device))
        table = _tables.get(key)
        if table is None:
            with _tables_lock:
                table = _tables.get(key)
                if table is None:
                    eye = torch.eye(op.n_out, dtype=torch.float32, device=device)
                    table = op.adjoint(eye, check_finite=False).T.contiguous()
                    _tables[key] = table
                    while sum(t.numel() for t in _tables.values()) > SHARED_TABLE_ENTRIES and len(_tables) > 1:
                        _tables.pop(next(iter(_tables)))
        return table

    def project(self, op, x: torch.Tensor) -> torch.Tensor:
        """``x P^T`` for rows ``x`` of length ``op.n_in`` (float32): the factor applied to each row."""
        table = self.transposed(op, x.device)
        return op.apply(x, check_finite=False) if table is None else x @ table

    def columns(self, block: Block, ids: torch.Tensor) -> torch.Tensor:
        """``P_r e_id`` for every id in ``ids`` (any shape): ``(*ids.shape, d_rows)``, float32.

        Rows of the row factor's table; without a table (a vocabulary too
        large for one), by sketching one-hot rows of the distinct ids.
        """
        op = self.row_factor(block)
        flat = ids.reshape(-1)
        table = self.transposed(op, ids.device)
        if table is not None:
            cols = table.index_select(0, flat)
        else:
            uniq, inverse = torch.unique(flat, return_inverse=True)
            onehot = torch.zeros(len(uniq), block.rows, dtype=torch.float32, device=ids.device)
            onehot[torch.arange(len(uniq), device=ids.device), uniq] = 1.0
            cols = op.apply(onehot, check_finite=False)[inverse]
        return cols.reshape(*ids.shape, block.d_rows)

    # ---------------------------------------------------------------- explicit reference
    def apply(self, g, *, check_finite: bool = True):
        """``S g`` for flattened gradients ``(B, N)`` or ``(N,)`` (torch, float32 or float64): the reference.

        Each block is ``P_r G P_c^T`` of its weight's gradient G (row-major),
        the small vector the whole-vector sketch of the pooled small
        gradients, in the layout's order.
        """
        if not isinstance(g, torch.Tensor):  # numpy in, numpy out
            return self.apply(torch.from_numpy(np.asarray(g)), check_finite=check_finite).numpy()
        squeeze = g.ndim == 1
        g = g.reshape(1, -1) if squeeze else g
        if g.shape[-1] != self.n_in:
            raise ValueError(f"gradients have length {g.shape[-1]}; this factored sketch expects N={self.n_in}")
        grads = dict(zip(self.param_names, torch.split(g, self.param_sizes, dim=1)))
        out = torch.empty(g.shape[0], self.n_out, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32,
                          device=g.device)
        for b in self.blocks:
            G = grads[b.param].reshape(-1, b.rows, b.cols)
            right = self.col_factor(b).apply(G.reshape(-1, b.cols), check_finite=False)  # (B*rows, d_c)
            right = right.reshape(-1, b.rows, b.d_cols).transpose(1, 2).reshape(-1, b.rows)
            both = self.row_factor(b).apply(right, check_finite=False).reshape(-1, b.d_cols, b.d_rows)
            out[:, b.offset:b.offset + b.size] = both.transpose(1, 2).reshape(-1, b.size)
        if self.small is not None:
            out[:, self.small.offset:self.small.offset + self.small.n_out] = self.small_op().apply(
                torch.cat([grads[n] for n in self.small.params], dim=1), check_finite=False)
        if check_finite and not bool(torch.isfinite(out).all()):
            raise ValueError("gradients contain non-finite values (NaN or inf)")
        return out[0] if squeeze else out


def _from_state(*args) -> FactoredSketch:
    return FactoredSketch(*args)


def factored_sketch(model: nn.Module, n_out: int, *, factor: str = "afjl", seed: int = 0, params=None,
                    layout: dict | None = None, paramset: ParamSet | None = None) -> FactoredSketch:
    """The factored per-layer sketch of a model's selected parameters with total dimension ``n_out``.

    Parameters
    ----------
    model : torch.nn.Module
    n_out : int
        Total D, split over the layers by :func:`split_budget`.
    factor : {"afjl", "qk", "dense"}
        Family of the factors ``P_r``, ``P_c`` (the small vector is sketched
        with afjl, or dense for dense).
    seed : int
    params : names or globs, optional
        The selection (as everywhere: default all parameters that require grad).
    layout : dict, optional
        A stored layout (``spec["layout"]``) to use instead of the rule; it
        must cover exactly this selection with these shapes.

    Raises
    ------
    FactoredSketchError
        A parameter of an unsupported module (named), a batch-coupled layer,
        an n_out the layers cannot hold, or a layout for other parameters.
    """
    from .params import select_params

    if factor not in FACTORS:
        raise FactoredSketchError(f"factor must be one of {list(FACTORS)}; got {factor!r}")
    for name, value in (("n_out", n_out), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    paramset = paramset or select_params(model, params)
    uses = model_uses(model, paramset)
    roles = _roles(uses)
    shapes = dict(zip(paramset.names, paramset.shapes))
    weights = [(n, shapes[n][0], shapes[n][1]) for n in paramset.names if roles.get(n) == "block"]
    small_names = tuple(n for n in paramset.names if roles.get(n) == "small")
    small_n = sum(math.prod(shapes[n]) for n in small_names)
    small_method = "dense" if factor == "dense" else "afjl"
    if layout is None:
        dims, d_small = split_budget(weights, small_n, n_out, pow2=factor == "qk")
        blocks, offset = [], 0
        for i, ((name, rows, cols), (dr, dc)) in enumerate(zip(weights, dims)):
            blocks.append(Block(name, rows, cols, dr, dc, offset, _seed(seed, i, "rows"), _seed(seed, i, "cols")))
            offset += dr * dc
        small = (SmallBlock(small_names, small_n, d_small, offset, _seed(seed, len(weights), "small"), small_method)
                 if d_small else None)
        if small is None and small_names:
            raise FactoredSketchError(f"n_out={n_out} leaves no coordinates for the {small_n} entries of "
                                      f"{len(small_names)} bias and normalisation parameter(s)")
    else:
        blocks = tuple(Block(**b) for b in layout["blocks"])
        s = layout.get("small")
        small = None if s is None else SmallBlock(**{**s, "params": tuple(s["params"])})
        expect = [(n, r, c) for n, r, c in weights]
        have = [(b.param, b.rows, b.cols) for b in blocks]
        if have != expect or (small.params if small else ()) != small_names:
            raise FactoredSketchError(
                f"the stored layout covers weights {[h[0] for h in have][:4]}... and small parameters "
                f"{list(small.params)[:4] if small else []}, but this model's selection has weights "
                f"{[e[0] for e in expect][:4]}... and small parameters {list(small_names)[:4]}")
        total = sum(b.size for b in blocks) + (small.n_out if small else 0)
        if total != n_out:
            raise FactoredSketchError(f"the stored layout holds {total} coordinates but the spec says n_out={n_out}")
    fs = FactoredSketch(factor, paramset.n, n_out, seed, tuple(blocks), small, paramset.names, paramset.sizes)
    for b in fs.blocks:  # build every factor now: a bad size fails here, not in a task
        fs.row_factor(b), fs.col_factor(b)
    fs.small_op()
    return fs


# ------------------------------------------------------------------ the batched computation
_checked: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()
_checked_lock = threading.Lock()


class _UseCheck(TorchFunctionMode):
    """Finds differentiable uses of a selected parameter outside the module that owns it.

    Hooks see a weight only where its module runs; a weight also used
    elsewhere (``F.linear(x, self.embed.weight)``, a penalty in the loss)
    would miss that part of its gradient, so such uses are refused by name.
    """

    def __init__(self, names: dict[int, str], owners: dict[int, set[int]]):
        super().__init__()
        self.names, self.owners, self.stack, self.stray = names, owners, [], {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if torch.is_grad_enabled():
            inside = self.stack[-1] if self.stack else None
            for t in [*args, *kwargs.values()]:
                for leaf in (t if isinstance(t, (list, tuple)) else (t,)):
                    name = self.names.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                    if name is not None and (inside is None or id(leaf) not in self.owners.get(inside, ())):
                        if isinstance(result, torch.Tensor) and result.requires_grad:
                            self.stray.setdefault(name, getattr(func, "__name__", str(func)))
        return result


def _mask_of(batch) -> torch.Tensor | None:
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"]
    return None


def _tokens(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    """``t`` as ``(B, tokens, features)`` float32 (a view where it can be)."""
    if t.shape[0] != b:
        raise FactoredSketchError(f"{what} has leading dimension {t.shape[0]}, not the batch's {b}: factored "
                                  "sketches need every supported layer to run on the batch's examples along its "
                                  "first dimension")
    return t.float().reshape(b, -1, t.shape[-1])


def _token_mask(t: torch.Tensor, mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """``(B, tokens, 1)`` float mask of the tokens of ``t`` (shape ``(B, *tokens, features)``), or None when
    the batch has no attention mask or ``t``'s token dimensions are not the mask's."""
    if mask is None or t.dim() < 3 or tuple(t.shape[1:-1]) != tuple(mask.shape[1:]):
        return None
    return mask.reshape(b, -1, 1).to(torch.float32)


def _project(sketch, op, t: torch.Tensor, b: int, keep: torch.Tensor | None) -> torch.Tensor:
    """``P t_tok`` for every token of ``(B, tokens, n)`` -> ``(B, tokens, d)``, masked tokens zero (projecting
    first: the mask multiplies d numbers per token, not n)."""
    out = sketch.project(op, t.reshape(-1, t.shape[-1])).reshape(b, t.shape[1], -1)
    return out if keep is None else out * keep


def sketch_batch(model: nn.Module, loss_fn: Callable, batch, paramset: ParamSet, sketch: FactoredSketch, *,
                 forward: Callable | None = None) -> dict[str, torch.Tensor]:
    """Factored sketches ``(B, D)``, losses ``(B,)`` and validity ``(B,)`` of one batch from one backward.

    Hooks on the modules that use the selected parameters record each call's
    input (projected by the column factor at once) and output; one
    ``autograd.grad`` of the summed losses with respect to those outputs
    gives the output-gradients (weights get no gradient); each block adds
    ``sum_t (P_r delta_t)(P_c a_t)^T`` per example.  Tokens with
    ``attention_mask`` 0 contribute nothing; an embedding's ``padding_idx``
    rows get nothing (as in its own backward); a layer called twice adds
    both calls.  A non-finite sketch or loss marks its example invalid (row
    NaN).
    """
    from .grads import batch_size_of, default_forward

    b = batch_size_of(batch)
    mask = _mask_of(batch)
    uses = model_uses(model, paramset)
    blocks = {blk.param: blk for blk in sketch.blocks}
    small_names = set(sketch.small.params) if sketch.small else set()
    known = set(blocks) | small_names
    selected = set(paramset.names)
    if known != selected:
        raise FactoredSketchError(f"the factored sketch covers {len(known)} parameters but the selection has "
                                  f"{len(selected)}; e.g. {sorted(known ^ selected)[:3]}")
    calls: list[tuple[_Use, Any, torch.Tensor]] = []
    owners = {id(u.module): {id(getattr(u.module, a)) for a in u.attrs} for u in uses}

    def pre_hook(module, args):
        if check is not None:
            check.stack.append(id(module))
        x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1 and b > 1:
            return (x.expand(b, *x.shape[1:]), *args[1:])  # a broadcast input (position ids): one row per example
        return None

    def make_hook(use: _Use):
        def hook(module, args, out):
            if check is not None and check.stack:
                check.stack.pop()
            x = args[0]
            with torch.no_grad():
                saved = _project_input(sketch, use, blocks, x, b, mask)
            # an output nothing upstream differentiates (no selected weight before it): a leaf to take its gradient
            replaced = not out.requires_grad
            if replaced:
                out = out.detach().requires_grad_(True)
            calls.append((use, saved, out))
            return out if replaced else None
        return hook

    first = False
    with _checked_lock:
        seen = _checked.setdefault(model, set())
        if paramset.names not in seen:
            first = True
    check = _UseCheck({id(p): n for n, p in model.named_parameters() if n in selected}, owners) if first else None
    handles = []
    try:
        for use in uses:
            handles.append(use.module.register_forward_pre_hook(pre_hook))
            handles.append(use.module.register_forward_hook(make_hook(use)))
        fwd = forward or default_forward
        if check is not None:
            with check:
                losses = loss_fn(fwd(model, batch), batch).reshape(-1)
        else:
            losses = loss_fn(fwd(model, batch), batch).reshape(-1)
    finally:
        for h in handles:
            h.remove()
    if check is not None:
        if check.stray:
            stray = ", ".join(f"{n!r} (in {f})" for n, f in sorted(check.stray.items()))
            raise FactoredSketchError(
                f"parameter(s) {stray} are used outside the module that owns them (a tied weight used "
                "functionally, or a penalty in the loss): a factored sketch sees a weight only where its module "
                "runs, so that part of the gradient would be missing; leave them out with params=... or use a "
                "whole-vector sketch")
        with _checked_lock:
            _checked.setdefault(model, set()).add(paramset.names)
    if losses.shape[0] != b:
        raise ValueError(f"loss_fn returned {losses.shape[0]} losses for a batch of {b} examples")
    outs = [out for _, _, out in calls]
    grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True) if outs else []
    result = torch.zeros(b, sketch.n_out, dtype=torch.float32, device=losses.device)
    small: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for (use, saved, out), delta in zip(calls, grads):
            if delta is None:
                continue
            _add_call(sketch, use, blocks, saved, delta, b, mask, result, small)
        if sketch.small is not None:
            parts = []
            sizes = dict(zip(paramset.names, paramset.sizes))
            for n in sketch.small.params:
                parts.append(small.get(n, torch.zeros(b, sizes[n], dtype=torch.float32, device=result.device)))
            s = sketch.small
            result[:, s.offset:s.offset + s.n_out] = sketch.small_op().apply(torch.cat(parts, 1), check_finite=False)
    losses = losses.detach()
    valid = torch.isfinite(result).all(dim=1) & torch.isfinite(losses)
    result = torch.where(valid[:, None], result, torch.full_like(result, float("nan")))
    return {"grad": result, "loss": losses, "valid": valid}


def _project_input(sketch, use: _Use, blocks, x, b, mask):
    """What a call keeps of its input: the factor's projection of it, the ids, or the normalised input."""
    if use.kind == "embedding":
        if x.shape[0] != b:
            raise FactoredSketchError(f"the ids given to an Embedding have leading dimension {x.shape[0]}, not the "
                                      f"batch's {b}")
        return x
    if use.kind == "layernorm":
        m = use.module
        dims = tuple(range(-len(m.normalized_shape), 0))
        xf = x.float()
        var, mean = torch.var_mean(xf, dims, unbiased=False, keepdim=True)
        return (xf - mean) * torch.rsqrt(var + m.eps)
    name = use.attrs.get("weight")
    if name is None:
        return None
    blk = blocks[name]
    op = sketch.col_factor(blk) if use.kind == "linear" else sketch.row_factor(blk)
    # padding is dropped on the output-gradient side: every term has one factor from each side
    return _project(sketch, op, _tokens(x, b, f"the input of a {type(use.module).__name__}"), b, None)


def _add_call(sketch, use: _Use, blocks, saved, delta, b, mask, result, small) -> None:
    """Add one call's contributions: its weight's block, and the exact sums of its small parameters."""
    m = use.module
    if use.kind == "layernorm":
        k = len(m.normalized_shape)
        d = delta.float()
        if mask is not None and d.dim() > k + 1 and tuple(d.shape[1:-k]) == tuple(mask.shape[1:]):
            d = d * mask.reshape(*mask.shape, *([1] * k)).to(d.dtype)
        lead = tuple(range(1, d.dim() - k))
        for attr, value in (("weight", d * saved), ("bias", d)):
            name = use.attrs.get(attr)
            if name is not None:
                _accumulate(small, name, (value.sum(lead) if lead else value).reshape(b, -1))
        return
    keep = _token_mask(delta, mask, b)
    dl = _tokens(delta, b, f"the output of a {type(m).__name__}")
    if "bias" in use.attrs:
        _accumulate(small, use.attrs["bias"], (dl if keep is None else dl * keep).sum(1))
    name = use.attrs.get("weight")
    if name is None:
        return
    blk = blocks[name]
    if use.kind == "embedding":
        ids = saved
        keep = None if mask is None or tuple(ids.shape[1:]) != tuple(mask.shape[1:]) else mask.reshape(b, -1, 1)
        if m.padding_idx is not None:  # the embedding's own backward gives its padding row nothing
            pad = (ids != m.padding_idx).reshape(b, -1, 1)
            keep = pad if keep is None else keep.to(torch.bool) & pad
        rows = sketch.columns(blk, ids).reshape(b, -1, blk.d_rows)  # P_r e_id
        if keep is not None:
            rows = rows * keep.to(rows.dtype)
        cols = _project(sketch, sketch.col_factor(blk), dl, b, None)
    elif use.kind == "linear":  # W (out, in): rows from delta, columns from the input
        rows, cols = _project(sketch, sketch.row_factor(blk), dl, b, keep), saved
    else:  # conv1d, W (in, out): rows from the input, columns from delta
        rows, cols = saved, _project(sketch, sketch.col_factor(blk), dl, b, keep)
    result[:, blk.offset:blk.offset + blk.size] += torch.bmm(rows.transpose(1, 2), cols).reshape(b, -1)


def _accumulate(small: dict, name: str, value: torch.Tensor) -> None:
    value = value.float()
    small[name] = value if name not in small else small[name] + value
