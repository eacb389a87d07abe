"""Settings dataclasses: documented defaults, checked values, dicts accepted, moved keywords named."""

from __future__ import annotations

import inspect

import pytest

import sketcharray as sa
from sketcharray.core.settings import SETTINGS, coerce, split_settings


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_field_is_documented_with_its_default(cls):
    doc = inspect.getdoc(cls)
    for name in cls.__dataclass_fields__:
        assert f"{name} :" in doc, f"{cls.__name__}.{name} is not documented"
    with pytest.raises(AttributeError):  # frozen: a shared settings object cannot change under a running call
        cls().__setattr__(next(iter(cls.__dataclass_fields__)), None)


@pytest.mark.parametrize("make, message", [
    (lambda: sa.ModelSettings(mode="fast"), r"ModelSettings.mode must be 'explicit' or 'implicit'; got 'fast'"),
    (lambda: sa.ModelSettings(per_example="jit"), r"ModelSettings.per_example must be 'auto', 'vmap' or 'loop'; got 'jit'"),
    (lambda: sa.ModelSettings(hvp_mode="exact"), r"ModelSettings.hvp_mode must be 'auto', 'forward-over-reverse' or"),
    (lambda: sa.Execution(shards=0), r"Execution.shards must be a positive int or None; got 0"),
    (lambda: sa.Execution(probes_per_task=2.5), r"Execution.probes_per_task must be a positive int; got 2.5"),
    (lambda: sa.SolverSettings(method="arnoldi"), r"SolverSettings.method must be 'lanczos' or 'randomized'; got 'arnoldi'"),
    (lambda: sa.SolverSettings(which="middle"), r"SolverSettings.which must be 'both', 'top' or 'bottom'; got 'middle'"),
    (lambda: sa.SolverSettings(tol=-1), r"SolverSettings.tol must be a positive number; got -1"),
    (lambda: sa.SolverSettings(method="randomized", max_iter=10),
     r"max_iter apply to method='lanczos' only; this is method='randomized'"),
    (lambda: sa.SolverSettings(n_iter=10), r"n_iter apply to method='randomized' only; this is method='lanczos'"),
    (lambda: sa.TrainingSettings(lr=0), r"TrainingSettings.lr must be a positive number; got 0"),
    (lambda: sa.TrainingSettings(min_improvement=-0.1), r"min_improvement must be a number >= 0"),
    (lambda: sa.SearchSettings(target=0), r"SearchSettings.target .* must be > 0; got 0"),
    (lambda: sa.SearchSettings(d0=64, d_max=32), r"d0 must be between 1 and d_max=32; got d0=64"),
    (lambda: sa.SearchSettings(seeds=(1, 1)), r"seeds must be distinct ints, at least one; got \(1, 1\)"),
])
def test_a_bad_value_is_refused_when_the_settings_are_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_dict_of_fields_stands_for_the_settings_and_an_unknown_field_is_named():
    assert coerce({"device": "cpu", "progress": False}, sa.Execution, "execution") == sa.Execution(device="cpu",
                                                                                                 progress=False)
    assert coerce(None, sa.Execution, "execution") == sa.Execution()
    with pytest.raises(TypeError, match=r"execution= got \['devise'\], which Execution does not have"):
        coerce({"devise": "cpu"}, sa.Execution, "execution")
    with pytest.raises(TypeError, match="solver= must be a SolverSettings, a dict of its fields or None; got str"):
        coerce("lanczos", sa.SolverSettings, "solver")


def test_split_settings_routes_each_option_to_its_class():
    search, training = split_settings({"d0": 8, "lr": 0.03, "reference_lr": 0.1}, sa.SearchSettings,
                                      sa.TrainingSettings)
    assert search == sa.SearchSettings(d0=8, reference_lr=0.1) and training == sa.TrainingSettings(lr=0.03)
    with pytest.raises(TypeError, match=r"options \['tol'\] belong to none of"):
        split_settings({"tol": 1e-3}, sa.SearchSettings, sa.TrainingSettings)


@pytest.mark.parametrize("call, moved", [
    (lambda: sa.sketch_gradients(None, None, None, None, device="cpu"), r"device= -> execution=sa.Execution"),
    (lambda: sa.sketch_gradients(None, None, None, None, params="w", progress=False),
     r"params= -> model_settings=sa.ModelSettings\(params=...\), progress= -> execution=sa.Execution"),
    (lambda: sa.hessian_spectrum(None, None, None, None, tol=1e-3), r"tol= -> solver=sa.SolverSettings"),
    (lambda: sa.hessian_spectrum(None, None, None, None, which="top"), r"which= -> solver=sa.SolverSettings"),
    (lambda: sa.intrinsic_dimension(None, None, None, None, d0=4), r"d0= -> search=sa.SearchSettings"),
    (lambda: sa.intrinsic_dimension(None, None, None, None, lr=0.1), r"lr= -> training=sa.TrainingSettings"),
    (lambda: sa.sketch_hvps(None, None, None, None, probes_per_task=2), r"probes_per_task= -> execution="),
])
def test_a_keyword_that_moved_into_settings_is_refused_naming_where_it_went(call, moved):
    with pytest.raises(TypeError, match=r"no longer takes .*" + moved):
        call()


def test_front_door_functions_have_short_signatures():
    """Issue 15: options beyond the essential ones are grouped in settings (hessian_spectrum, the widest, has its
    four positional arguments and eight keywords)."""
    widths = {}
    for name in sa._FRONT_DOOR:
        obj = getattr(sa, name)
        if inspect.isfunction(obj):
            params = inspect.signature(obj).parameters.values()
            widths[name] = sum(p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    assert max(widths.values()) <= 12, {k: v for k, v in widths.items() if v > 12}
    assert sum(v > 10 for v in widths.values()) <= 3, widths


def test_subpackages_are_attributes_of_the_package():
    """Issue 22, item 5: ``sa.analysis`` (and the other subpackages) reachable as attributes, loaded on use."""
    import sketcharray as sa

    assert sa.analysis.tda.attribute is sa.attribute
    assert "analysis" in dir(sa)
