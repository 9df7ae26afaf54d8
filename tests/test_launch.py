"""The install extras and launch recipes (setup.py, README's "GPU and TPU", docs/launch_*.sh, docs/LAUNCH.md).

Nothing here launches a run: the extras must name jax's own extras, the README's install commands must name
extras setup.py defines, the scripts must parse (`bash -n`), and every `--config.X` flag they pass must be a
field of the config they pass it to, so that the recipes cannot rot when a config field is renamed.
"""

from __future__ import annotations

import ast
import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "docs", "launch_*.sh")))
RECIPES = SCRIPTS + [os.path.join(ROOT, "docs", "LAUNCH.md")]
ACCELERATOR_EXTRAS = ("cuda12", "cuda13", "tpu")


def setup_constants() -> dict:
    """setup.py's module-level constants (INSTALL_REQUIRES, EXPORT, EXTRAS, ...), read without running setup():
    only its top-level assignments are executed."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    assigns = [node for node in tree.body if isinstance(node, ast.Assign)]
    namespace: dict = {}
    exec(compile(ast.Module(body=assigns, type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102
    return namespace


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_accelerator_extras_are_jax_own_extras():
    extras = setup_constants()["EXTRAS"]
    jax_extras = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
    for name in ACCELERATOR_EXTRAS:
        (req,) = [Requirement(r) for r in extras[name]]
        assert req.name == "jax" and req.extras == {name}, (name, str(req))
        assert name in jax_extras, f"jax {importlib.metadata.version('jax')} has no extra {name!r}: {jax_extras}"
    # The other extras stay as they were.
    assert {"test", "export", "torch"} <= set(extras)


def test_readme_and_recipes_install_only_defined_extras():
    extras = set(setup_constants()["EXTRAS"])
    readme = read(os.path.join(ROOT, "README.md"))
    named = []
    for path, text in [("README.md", readme)] + [(p, read(p)) for p in RECIPES]:
        for group in re.findall(r"pip install[^\n]*?-e\s+['\"]?\.\[([\w,-]+)\]", text):
            named += [(path, e) for e in group.split(",")]
    assert {e for _, e in named} >= set(ACCELERATOR_EXTRAS), named  # the README gives each install command
    unknown = [(p, e) for p, e in named if e not in extras]
    assert not unknown, f"install commands name extras setup.py does not define: {unknown}"
    assert 'python -c "import jax; print(jax.devices())"' in readme


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_launch_script_parses(script):
    text = read(script)
    assert text.startswith("#!") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script} is not executable"
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_there_are_three_recipes():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"launch_slurm.sh", "launch_tpu_pod.sh", "launch_local_2proc.sh"} <= names, names


_configs: dict = {}


def load_config(spec: str):
    """`get_config(arg)` of 'configs/FILE.py[:ARG]', as train.py's --config=... loads it."""
    if spec not in _configs:
        path, _, arg = spec.partition(":")
        module_spec = importlib.util.spec_from_file_location(f"launch_config_{len(_configs)}", os.path.join(ROOT, path))
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _configs[spec] = module.get_config(arg or None)
    return _configs[spec]


def has_field(config, dotted: str) -> bool:
    node = config
    for key in dotted.split("."):
        try:
            node = node[key]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_config_flag_of_a_recipe_is_a_config_field(recipe):
    text = read(recipe)
    flags = sorted(set(re.findall(r"--config\.([A-Za-z_][\w.]*\w)=", text)))
    # The configs the recipe runs (configs/FILE.py[:ARG]); the flags must hold in each of them. yolos_s
    # stands for the configs given as a variable.
    specs = sorted(set(re.findall(r"configs/\w+\.py(?::[\w.=]+)?", text))) or ["configs/yolos_s.py"]
    if recipe.endswith(".sh"):
        assert flags, f"{recipe} passes no --config.X flags"
    for spec in specs:
        config = load_config(spec)
        missing = [f for f in flags if not has_field(config, f)]
        assert not missing, f"{os.path.basename(recipe)}: not fields of {spec}: {missing}"


def test_the_local_rehearsal_passes_what_the_two_process_test_passes():
    """The rehearsal joins its processes with the flags tests/test_train_e2e.py uses; the cluster recipes rely on
    the environment (no explicit coordinator)."""
    local = read(os.path.join(ROOT, "docs", "launch_local_2proc.sh"))
    for flag in ("coordinator_address", "num_processes", "process_id", "heartbeat_timeout_s"):
        assert f"--config.distributed.{flag}=" in local
    for name in ("launch_slurm.sh", "launch_tpu_pod.sh"):
        assert "--config.distributed.coordinator_address=" not in read(os.path.join(ROOT, "docs", name))
    assert "srun" in read(os.path.join(ROOT, "docs", "launch_slurm.sh"))
    assert "--worker=all" in read(os.path.join(ROOT, "docs", "launch_tpu_pod.sh"))
