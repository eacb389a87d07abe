"""Which parameters make up N, in which order, and a fingerprint of the model."""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSet:
    """An ordered selection of a model's parameters, flattened into one vector of length N."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate ``tensors[name]`` (each ``(*batch, *shape)``) into ``(*batch, N)``."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``(*batch, N)`` into ``{name: (*batch, *shape)}`` (views, no copy)."""
        batch = flat.shape[:-1]
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[..., start : start + size].reshape(*batch, *shape)
            start += size
        return out

    def to_attrs(self) -> dict:
        return {"param_names": list(self.names), "param_sizes": list(self.sizes)}


def as_module(model, *, copy: bool = False) -> nn.Module:
    """The module a model-or-factory argument stands for: ``model`` itself (a deep copy with ``copy``),
    or what the factory ``model()`` returns, which must be a ``torch.nn.Module``."""
    if isinstance(model, nn.Module):
        if copy:
            import copy as copying

            return copying.deepcopy(model)
        return model
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a factory returning one; got {type(model).__name__}")
    built = model()
    if not isinstance(built, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a factory returning one; the factory returned "
                        f"{type(built).__name__}")
    return built


def select_params(model: nn.Module, params=None) -> ParamSet:
    """The parameters to sketch: all that require grad, or those named / matching glob patterns.

    Parameters
    ----------
    model : torch.nn.Module
    params : None, str or sequence of str
        Exact names (``"0.weight"``) or ``fnmatch`` patterns (``"encoder.layer.5.*"``).

    Raises
    ------
    ValueError
        A pattern that matches no parameter, or an empty selection.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        chosen = []
        for pattern in patterns:
            hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                sample = ", ".join(n for n, _ in named[:8])
                raise ValueError(
                    f"params pattern {pattern!r} matches no trainable parameter; "
                    f"the model has: {sample}{', ...' if len(named) > 8 else ''}"
                )
            chosen += [h for h in hits if h[0] not in {c[0] for c in chosen}]
        order = {n: i for i, (n, _) in enumerate(named)}
        chosen.sort(key=lambda np_: order[np_[0]])
    if not chosen:
        raise ValueError("no trainable parameters selected: the model has none that require grad")
    return ParamSet(tuple(n for n, _ in chosen), tuple(tuple(p.shape) for _, p in chosen))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of every parameter's and buffer's name, dtype, shape and values."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_weights(path) -> dict:
    """A ``torch.save``d state_dict, loaded with ``weights_only=True`` (tensors and plain containers, no code)."""
    import warnings
    import zipfile

    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write: the error says it all
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a file that is not (only) weights, RuntimeError for a bad zip
        kind = "" if zipfile.is_zipfile(path) else " (it is not a torch.save archive: a raw pickle or another file)"
        raise ValueError(f"checkpoint {path} cannot be loaded as weights only ({type(exc).__name__}){kind}: checkpoints "
                         "are read with torch.load(weights_only=True), which refuses anything but tensors and "
                         "plain containers (nothing in them can run code); save model.state_dict()") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a state_dict (a dict of "
                         "tensors)")
    return state
