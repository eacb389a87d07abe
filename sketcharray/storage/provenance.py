"""What made a set of sketches, and the check that two sets may meet.

Two sketch sets can be compared (a query against training examples, a
preconditioner against the sketches it preconditions, checkpoints stacked
for TracIn-CP) only when the same operator Phi made them from the same
parameter selection: ``<Phi g, Phi g'>`` estimates ``<g, g'>`` for one Phi,
and is noise for two.  The record of what made a set lives in its attrs
(``sketch_spec``, ``param_names``, ``param_sizes``, ``model_fingerprint``,
``checkpoint``), in a store's root attributes and on every Dataset and
DataArray this package returns.  :func:`check_same_sketch` compares two such
records and refuses a mismatch with both values named.

The model fingerprint is different by design across checkpoints; at one
checkpoint, training and query sketches of different models are refused
unless the caller says the difference is intended
(``allow_model_mismatch=True``, e.g. queries from a fine-tuned model against
its base), and the result then records that it was allowed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import types
from typing import Any

import numpy as np
import xarray as xr

#: attrs that say which operator and which parameters made a set of sketches
SKETCH_KEYS = ("param_names", "param_sizes", "sketch_spec")  # the parameters first: they also change n_in
PROVENANCE_KEYS = (*SKETCH_KEYS, "model_fingerprint", "checkpoint", "loss_fn", "loss_fn_identity")


# ------------------------------------------------------- function identity
class WeakIdentityWarning(UserWarning):
    """A function's identity leaves out a value it depends on (see :func:`function_identity`)."""


def function_name(fn) -> str:
    """``module.qualname`` of a function (or a partial's function): the readable half of its provenance."""
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def function_identity(fn) -> tuple[str, list[str]]:
    """An identity of a function that differs when what it computes differs, and what it could not read.

    Returns ``(identity, unread)``: 16 hex digits of SHA-256 over the
    function's name, its byte code and constants (nested functions and
    lambdas included), its defaults, the values of its closure cells and of
    the plain data globals it names (numbers, strings, tuples of them,
    arrays, tensors; functions of the same module recursively), and for a
    ``functools.partial`` the bound arguments and keywords.  So
    ``partial(loss, smoothing=0.0)`` and ``partial(loss, smoothing=0.5)``,
    two lambdas of one module, and a function edited between two runs all
    get different identities.

    What it cannot tell apart, listed in ``unread``: objects whose value it
    cannot read (an instance whose ``repr`` is its memory address, e.g. a
    module or tensor-holding object bound into a partial), the behaviour of
    the library functions a loss calls (their code is not hashed), and
    mutable state read at call time.  The caller warns when ``unread`` is
    not empty.
    """
    h = hashlib.sha256()
    unread: list[str] = []
    h.update(function_name(fn).encode())
    _feed(h, fn, unread, depth=0, seen=set())
    return h.hexdigest()[:16], unread


def _feed(h, value, unread: list[str], depth: int, seen: set) -> None:
    """Hash ``value`` into ``h``: by content where it can be read, else by type, noting it in ``unread``."""
    if depth > 6:
        h.update(b"<deep>")
        return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    elif isinstance(value, (tuple, list, frozenset, set)):
        h.update(f"{type(value).__name__}[{len(value)}](".encode())
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        for v in items:
            _feed(h, v, unread, depth + 1, seen)
        h.update(b")")
    elif isinstance(value, dict):
        h.update(f"dict[{len(value)}](".encode())
        for k in sorted(value, key=repr):
            _feed(h, k, unread, depth + 1, seen)
            _feed(h, value[k], unread, depth + 1, seen)
        h.update(b")")
    elif isinstance(value, np.ndarray) or type(value).__module__.split(".")[0] == "torch" and hasattr(value, "numpy"):
        arr = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        h.update(f"array:{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif isinstance(value, functools.partial):
        h.update(b"partial(")
        _feed(h, value.func, unread, depth + 1, seen)
        _feed(h, value.args, unread, depth + 1, seen)
        _feed(h, value.keywords, unread, depth + 1, seen)
        h.update(b")")
    elif isinstance(value, types.FunctionType):
        if id(value) in seen:  # recursion: named, not followed
            h.update(function_name(value).encode())
            return
        seen.add(id(value))
        h.update(function_name(value).encode())
        _feed_code(h, value.__code__)
        _feed(h, value.__defaults__, unread, depth + 1, seen)
        _feed(h, value.__kwdefaults__, unread, depth + 1, seen)
        for name, cell in zip(value.__code__.co_freevars, value.__closure__ or ()):
            h.update(f"cell:{name}".encode())
            try:
                _feed(h, cell.cell_contents, unread, depth + 1, seen)
            except ValueError:  # an empty cell
                h.update(b"<empty>")
        for name in _global_names(value.__code__):
            if name in value.__globals__:
                g = value.__globals__[name]
                if isinstance(g, (types.ModuleType, type)) or callable(g) and not isinstance(g, types.FunctionType):
                    h.update(f"global:{name}:{getattr(g, '__name__', type(g).__name__)}".encode())
                elif isinstance(g, types.FunctionType) and g.__module__ != value.__module__:
                    h.update(f"global:{name}:{function_name(g)}".encode())  # a library's: named, not hashed
                else:
                    h.update(f"global:{name}".encode())
                    _feed(h, g, unread, depth + 1, seen)
    elif isinstance(value, (types.BuiltinFunctionType, types.ModuleType, type)):
        h.update(f"{type(value).__name__}:{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', getattr(value, '__name__', ''))}".encode())
    elif isinstance(value, types.MethodType):
        _feed(h, value.__func__, unread, depth + 1, seen)
        _feed(h, value.__self__, unread, depth + 1, seen)
    else:
        text = repr(value)
        h.update(f"{type(value).__module__}.{type(value).__qualname__}".encode())
        if " at 0x" in text or len(text) > 10_000:
            unread.append(f"{type(value).__qualname__} (no readable value)")
        else:
            h.update(text.encode())


def _feed_code(h, code) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    h.update(repr(code.co_varnames).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const)
        else:
            h.update(f"{type(const).__name__}:{const!r}".encode())


def _global_names(code) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return sorted(set(names))


def _parsed(value):
    """An attr as a Python value (stores keep dicts and lists as JSON strings)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def provenance(obj) -> dict[str, Any] | None:
    """The provenance record of a Dataset or DataArray of sketches, or None when it carries none.

    With a ``checkpoint`` dimension (sketches stacked over checkpoints),
    ``model_fingerprint`` is a dict ``{checkpoint: fingerprint}`` read from
    the coordinate of that name.
    """
    attrs = getattr(obj, "attrs", None)
    if not attrs or "sketch_spec" not in attrs:
        return None
    record = {key: _parsed(attrs.get(key)) for key in PROVENANCE_KEYS}
    if record["checkpoint"] == "":  # a store keeps "no checkpoint" as an empty string
        record["checkpoint"] = None
    coords = getattr(obj, "coords", {})
    if "model_fingerprint" in coords and "checkpoint" in coords["model_fingerprint"].dims:
        fp = coords["model_fingerprint"]
        record["model_fingerprint"] = {str(c): str(f) for c, f in zip(fp["checkpoint"].values, fp.values)}
        record["checkpoint"] = [str(c) for c in fp["checkpoint"].values]
    return record


def with_provenance(obj, record: dict | None):
    """``obj`` with the provenance record in its attrs (scalar entries only; None leaves it as is)."""
    if record is None:
        return obj
    obj.attrs.update({k: v for k, v in record.items() if k in SKETCH_KEYS or not isinstance(v, (dict, list))})
    return obj


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 300 else text[:297] + "..."


def check_same_sketch(a: dict | None, b: dict | None, *, names: tuple[str, str] = ("train", "queries"),
                      allow_model_mismatch: bool = False) -> str | None:
    """Refuse two sketch sets made by different operators, parameters or (at one checkpoint) models.

    Parameters
    ----------
    a, b : dict or None
        Records from :func:`provenance`; a None (a bare array) has nothing
        to compare and passes.
    names : (str, str)
        What the two sets are, for the message.
    allow_model_mismatch : bool
        Accept different model fingerprints at the same checkpoint.

    Returns
    -------
    str or None
        A note describing the allowed model mismatch, to record in the
        result's attrs; None when the models agree.

    Raises
    ------
    ValueError
        Naming the differing key and both values.
    """
    if a is None or b is None:
        return None
    for key in SKETCH_KEYS:
        if a.get(key) != b.get(key):
            raise ValueError(
                f"{names[0]} and {names[1]} were sketched differently: {names[0]} has {key}={_short(a.get(key))}, "
                f"{names[1]} has {key}={_short(b.get(key))}; scores between two sketches are meaningless, "
                "sketch both with the same operator (method, n_out, seed, options) and parameters")
    la, lb = a.get("loss_fn"), b.get("loss_fn")
    if la and lb and la != lb:  # recorded since 0.3: gradients of different functions do not compare
        raise ValueError(f"{names[0]} and {names[1]} are gradients of different functions: {names[0]} of {la}, "
                         f"{names[1]} of {lb}; sketch both with the same loss (or model output) function")
    ia, ib = a.get("loss_fn_identity"), b.get("loss_fn_identity")
    if ia and ib and ia != ib:  # recorded since 0.5: the same name, other code or other bound values
        raise ValueError(f"{names[0]} and {names[1]} are gradients of different functions: both of {la}, but "
                         f"{names[0]} of the one with identity {ia} and {names[1]} of {ib} (other code, bound "
                         "arguments or closure values, e.g. another smoothing of a partial); sketch both with the "
                         "same loss (or model output) function")
    fa, fb = a.get("model_fingerprint"), b.get("model_fingerprint")
    if isinstance(fa, dict) or isinstance(fb, dict):
        ca = sorted(fa) if isinstance(fa, dict) else [str(a.get("checkpoint"))]
        cb = sorted(fb) if isinstance(fb, dict) else [str(b.get("checkpoint"))]
        if ca != cb:
            raise ValueError(f"{names[0]} holds checkpoints {ca} but {names[1]} holds {cb}; TracIn-CP needs "
                             "both sketched at the same checkpoints")
        fa = fa if isinstance(fa, dict) else {ca[0]: fa}
        fb = fb if isinstance(fb, dict) else {cb[0]: fb}
        differ = [c for c in ca if fa[c] != fb[c]]
        detail = "; ".join(f"checkpoint {c}: {names[0]} model {fa[c]}, {names[1]} model {fb[c]}" for c in differ)
    else:
        differ = [] if fa == fb else [a.get("checkpoint")]
        detail = (f"{names[0]} model {fa} (checkpoint {a.get('checkpoint')!r}), {names[1]} model {fb} "
                  f"(checkpoint {b.get('checkpoint')!r})")
    if not differ:
        return None
    if not allow_model_mismatch:
        raise ValueError(f"{names[0]} and {names[1]} come from different model weights ({detail}); pass "
                         "allow_model_mismatch=True (--allow-model-mismatch) if that is intended, e.g. queries "
                         "from a fine-tuned model against its base")
    return detail


def stack_checkpoints(sketches: dict[str, xr.Dataset] | list[xr.Dataset]) -> xr.Dataset:
    """Gradient sketches of the same examples at several checkpoints, stacked for TracIn-CP.

    Parameters
    ----------
    sketches : dict name -> Dataset, or list of Datasets
        Each from :func:`sketcharray.storage.store.open_sketches` or
        ``sketch_gradients`` at one checkpoint (a list takes the names
        from each Dataset's ``checkpoint`` attr).

    Returns
    -------
    xarray.Dataset
        ``grad`` (checkpoint, example, sketch), ``valid`` (example: valid at
        every checkpoint), ``loss`` (checkpoint, example), and a
        ``model_fingerprint`` coordinate along ``checkpoint``; lazy.

    Raises
    ------
    ValueError
        When the sets were made by different sketches or parameters, hold
        different example ids, or share a checkpoint name.
    """
    if isinstance(sketches, dict):
        items = list(sketches.items())
    else:
        items = [(str(ds.attrs.get("checkpoint")), ds) for ds in sketches]
    if not items:
        raise ValueError("stack_checkpoints needs at least one Dataset; got none")
    names = [str(n) for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint names must be unique; got {names} (name them with a dict)")
    first_name, first = items[0]
    base = provenance(first)
    for name, ds in items[1:]:
        check_same_sketch(base, provenance(ds), names=(f"checkpoint {first_name}", f"checkpoint {name}"),
                          allow_model_mismatch=True)
        if not np.array_equal(np.asarray(ds["example"].values, dtype=object),
                              np.asarray(first["example"].values, dtype=object)):
            raise ValueError(f"checkpoint {name} holds other example ids than checkpoint {first_name} "
                             f"({ds.sizes['example']} vs {first.sizes['example']} examples)")
    fingerprints = [str((provenance(ds) or {}).get("model_fingerprint")) for _, ds in items]
    keep = [v for v in ("grad", "loss") if all(v in ds for _, ds in items)]
    stacked = xr.concat([ds[keep].drop_vars("checkpoint", errors="ignore") for _, ds in items], dim="checkpoint",
                        combine_attrs="drop")
    stacked = stacked.assign_coords(checkpoint=names, model_fingerprint=("checkpoint", fingerprints))
    if all("valid" in ds for _, ds in items):
        stacked["valid"] = xr.concat([ds["valid"].drop_vars("checkpoint", errors="ignore") for _, ds in items],
                                     dim="checkpoint").all("checkpoint")
    record = {k: base.get(k) for k in SKETCH_KEYS} if base else None
    if record:
        stacked.attrs.update(record)
        with_provenance(stacked["grad"], record)
    return stacked
