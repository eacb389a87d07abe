"""The package's two locks around PyTorch, with why each exists (every other lock guards a cache).

``AUTODIFF`` (re-entrant)
    One autodiff computation at a time per process, for two reasons.
    PyTorch's forward-mode AD levels are process-global, not per thread: two
    threads inside ``jvp`` at once corrupt each other's level (HVPs are
    forward-over-reverse).  And torch already uses every core inside one
    batch's backward pass, while concurrent callers make its kernels pick
    other blockings, so results would vary in the last bits between runs --
    and a resumed store must be bit-identical to an uninterrupted one.  Dask
    runs tasks in threads, so every per-batch gradient and every HVP takes
    it (re-entrant: a task holding it may call an HVP that takes it too).
    The sketch of a batch runs inside it too, on all cores: the compiled
    kernels split their work over their own pool (``sketches.backend``).

``BUILD``
    Building or moving a model sets ``param.data``, which torch refuses
    while any thread is inside a ``torch.func`` transform: it is done under
    this lock, once per model and thread.

Worker threads run private copies of a module (``functional_call`` swaps
parameters, so threads must not share one); the main thread runs the
caller's module itself.
"""

from __future__ import annotations

import threading

AUTODIFF = threading.RLock()
BUILD = threading.Lock()
