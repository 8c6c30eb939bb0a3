"""The public surface: the errors a user may catch, the method registry, and options checked by name."""
import pytest
import torch

import kdwrap
from conftest import TinyNet
from kdwrap import FusionError, KDWrapError, OptionError, SplitError, TraceError


def test_errors_are_importable_and_share_a_base():
    for err in (SplitError, TraceError, FusionError, OptionError):
        assert issubclass(err, KDWrapError)
    # The built-in type a caller would expect without kdwrap still catches them.
    assert issubclass(SplitError, ValueError) and issubclass(TraceError, RuntimeError)
    assert issubclass(OptionError, TypeError)


def test_a_bad_split_raises_the_public_split_error():
    with pytest.raises(KDWrapError, match="no_such_layer"):
        kdwrap.one(TinyNet(), split="no_such_layer")


@pytest.mark.parametrize("method, option, hint", [
    ("one", "temprature", "did you mean 'temperature'"),
    ("osakd", "bank", "did you mean 'bank_size'"),
    ("osakd", "branches", "valid options: k, alpha, bank_size"),
    ("dml", "temprature", "did you mean 'temperature'"),
    ("okddip", "temprature", "did you mean 'temperature'"),
    ("byot", "feature_wieght", "did you mean 'feature_weight'"),
    ("pcl", "mean_decai", "did you mean 'mean_decay'"),
])
def test_an_unknown_option_names_itself_and_the_valid_ones(method, option, hint):
    with pytest.raises(OptionError, match=hint) as info:
        kdwrap.wrap(TinyNet(), method=method, **{option: 1})
    assert repr(option) in str(info.value)


def test_wrap_dispatches_through_the_registry():
    assert set(kdwrap.METHODS) == {"one", "osakd", "kd", "dml", "okddip", "byot", "pcl"}
    assert kdwrap.METHODS["one"] is kdwrap.one and kdwrap.METHODS["kd"] is kdwrap.kd

    calls = []

    @kdwrap.register_method("tiny-test-method")
    def tiny(net, scale=1.0):
        calls.append(scale)
        return kdwrap.osakd(net)

    try:
        model, loss_fn = kdwrap.wrap(TinyNet(), method="tiny-test-method", scale=2.0)
        assert calls == [2.0] and model.method == "osakd"
        with pytest.raises(ValueError, match="already registered"):
            kdwrap.register_method("tiny-test-method")(tiny)
    finally:
        del kdwrap.METHODS["tiny-test-method"]
    with pytest.raises(ValueError, match="valid methods: one, osakd, kd, dml, okddip, byot, pcl"):
        kdwrap.wrap(TinyNet(), method="tiny-test-method")


def test_builders_take_options_by_keyword_only():
    from kdwrap.methods.one import build_one

    with pytest.raises(TypeError):
        build_one(TinyNet(), 3)  # a positional option would silently bind to the wrong name if order changed
    model, _ = build_one(TinyNet(), branches=2)
    assert model.num_branches == 2
    assert model(torch.randn(2, 3, 16, 16)).shape[0] == 2


def test_version_is_the_packages_and_the_command_line_prints_it(capsys) -> None:
    import re
    import tomllib
    from pathlib import Path

    from kdwrap.__main__ import main

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert kdwrap.__version__ == pyproject["project"]["version"]
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert re.fullmatch(rf"kdwrap {re.escape(kdwrap.__version__)}\s*", capsys.readouterr().out)
