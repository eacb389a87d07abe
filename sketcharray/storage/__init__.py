"""Where sketches and results live.

The sketch store, one concern per module: ``layout`` (variables, format,
codecs, digests, errors), ``lock`` (one writer at a time), ``write``
(creating a store whole, writing a batch), ``read`` (lazy reads with every
chunk checked), ``verify`` (verification, preparing and repairing a store
for a run), ``backend`` (xarray's ``engine="sketcharray"``); ``store`` is
their one import path.  Beside them: ``provenance`` (what made a set of
sketches and the check where two sets meet) and ``outputs`` (where results
may be written).  No torch.
"""
