"""yolos_jax/xla_flags.py: `set_cpu_flags` appends to $XLA_FLAGS without duplicating a flag (one the user set wins),
returns the new value, and when jax is already imported still sets it but warns that it may be ignored."""

import os
import sys
import warnings

import pytest

from yolos_jax import xla_flags

USER = "--xla_force_host_platform_device_count=8"


@pytest.fixture
def xla_env(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", USER)  # restored after the test: this process's jax never sees the changes
    return monkeypatch


def test_appends_once_and_the_users_value_wins(xla_env):
    xla_env.delitem(sys.modules, "jax")  # as in an entry script, before jax is imported (put back afterwards)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning before jax is imported
        value = xla_flags.set_cpu_flags(["--xla_cpu_use_onednn=true", "--xla_force_host_platform_device_count=2"])
        assert value == os.environ["XLA_FLAGS"] == f"{USER} --xla_cpu_use_onednn=true"
        again = xla_flags.set_cpu_flags(["--xla_cpu_use_onednn=false", "--xla_cpu_prefer_vector_width=512"])
    assert again == f"{USER} --xla_cpu_use_onednn=true --xla_cpu_prefer_vector_width=512"  # no duplicate flag


def test_from_an_empty_environment(xla_env):
    xla_env.delenv("XLA_FLAGS")
    xla_env.delitem(sys.modules, "jax")
    assert xla_flags.set_cpu_flags(["--xla_cpu_use_onednn=true"]) == "--xla_cpu_use_onednn=true"
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"


def test_after_jax_is_imported_it_warns_and_changes_nothing_else(xla_env):
    import jax  # noqa: F401

    with pytest.warns(UserWarning, match="called after jax was imported"):
        value = xla_flags.set_cpu_flags(["--xla_cpu_use_onednn=true"])
    assert value == os.environ["XLA_FLAGS"] == f"{USER} --xla_cpu_use_onednn=true"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to add: nothing to warn about
        assert xla_flags.set_cpu_flags(["--xla_cpu_use_onednn=false"]) == value


def test_the_default_changes_nothing_today(xla_env):
    """No flag helped in the module's measurements: the recommended list is empty, so the default call (the
    benchmarks' and entry scripts') leaves $XLA_FLAGS as it is, without a warning even after jax is imported."""
    import jax  # noqa: F401

    assert xla_flags.RECOMMENDED_CPU_FLAGS == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xla_flags.set_cpu_flags() == os.environ["XLA_FLAGS"] == USER
