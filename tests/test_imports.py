"""Imports cost what they use. Each check runs in a fresh interpreter: `import researchlab.design.core` and
`import researchlab` leave MLflow, GitPython, IPython, matplotlib and gymnax unimported; every name of the lazy
table resolves to the object its module defines; `rlab --help` and `rlab upload` import no gymnax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"mlflow", "git", "IPython", "matplotlib", "gymnax", "plotly"}

# the modules whose public names `researchlab` re-exports (their type variables S, C, T excepted)
LIBRARY_MODULES = ["researchlab.design.core", "researchlab.design.utils", "researchlab.design.data",
                   "researchlab.design.telemetry", "researchlab.design.mlflow_rules",
                   "researchlab.design.mlflow_telemetry", "researchlab.design.persist",
                   "researchlab.design.eqx_persist", "researchlab.design.orbax_persist", "researchlab.design.infra",
                   "researchlab.design.visualizer", "researchlab.design.step_checks", "researchlab.design.loop",
                   "researchlab.design.widget", "researchlab.design.population", "researchlab.design.compile_cache",
                   "researchlab.tracking.utils", "researchlab.llm.types", "researchlab.llm.tokenizers",
                   "researchlab.llm.chat", "researchlab.llm.models", "researchlab.llm.generate", "researchlab.llm.lora",
                   "researchlab.tracking.tracker", "researchlab.tracking.magic", "researchlab.tracking.compare",
                   "researchlab.tracking.run", "researchlab.tracking.fork",
                   "researchlab.tracking.reproduce",
                   "researchlab.tracking.sweep",
                   "researchlab.rl", "researchlab.llm.tools", "researchlab.llm.rollouts", "researchlab.llm.envs",
                   "researchlab.llm.rewards", "researchlab.llm.train", "researchlab.llm.view"]
TYPEVARS = {"S", "C", "T"}


def _python(code: str) -> dict:
    "Run `code` in a fresh interpreter of this environment; it prints one JSON object as its last line."
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


_TOP_LEVEL = "sorted({m.split('.')[0] for m in sys.modules})"


def _loaded_after(statement: str) -> set[str]:
    "Top-level packages in `sys.modules` after running `statement`."
    out = _python(f"import sys\n{statement}\nimport json, researchlab\n"
                  f"print(json.dumps({{'file': researchlab.__file__, 'modules': {_TOP_LEVEL}}}))")
    assert Path(out["file"]).resolve().is_relative_to(ROOT), out["file"]  # this checkout's researchlab
    return set(out["modules"])


def test_core_imports_no_infrastructure() -> None:
    loaded = _loaded_after("import researchlab.design.core")
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_package_import_is_lazy() -> None:
    loaded = _loaded_after("import researchlab")
    assert not loaded & HEAVY, sorted(loaded & HEAVY)
    assert "jax" not in loaded  # nothing is imported before a name is used


def test_every_lazy_name_resolves_and_is_listed() -> None:
    out = _python(f"""
        import importlib, json, researchlab
        expected = {{}}
        for m in {LIBRARY_MODULES!r}:
            for n in importlib.import_module(m).__all__:
                if n not in {sorted(TYPEVARS)!r}:
                    expected.setdefault(n, m)
        wrong = [n for n, m in expected.items() if getattr(researchlab, n) is not getattr(importlib.import_module(m), n)]
        print(json.dumps({{'expected': sorted(expected), 'all': researchlab.__all__, 'dir': dir(researchlab),
                           'wrong': wrong, 'typevars': [t for t in {sorted(TYPEVARS)!r} if hasattr(researchlab, t)],
                           'magic': callable(researchlab.load_ipython_extension)}}))
    """)
    assert not out["wrong"], out["wrong"]
    assert set(out["expected"]) <= set(out["all"]), sorted(set(out["expected"]) - set(out["all"]))
    assert set(out["all"]) <= set(out["dir"]), sorted(set(out["all"]) - set(out["dir"]))
    assert len(out["all"]) == len(set(out["all"]))
    assert not out["typevars"], out["typevars"]
    assert out["magic"]  # `%load_ext researchlab` finds it
    assert {"Config", "Loop", "MLFlowTelemetry", "ExperimentTracker", "compute_grpo_loss", "Visualizer"} <= set(out["all"])


def test_an_unknown_name_is_an_attribute_error() -> None:
    out = _python("""
        import json, researchlab
        try:
            researchlab.no_such_name
        except AttributeError as e:
            print(json.dumps({'error': str(e)}))
    """)
    assert "no attribute 'no_such_name'" in out["error"]


def _rlab(args: list[str]) -> dict:
    "`rlab ARGS` through `researchlab.cli.main` in a fresh interpreter: exit status and the packages it loaded."
    return _python(f"""
        import json, sys
        from researchlab.cli import main
        try:
            code = main({args!r})
        except SystemExit as e:
            code = e.code
        print(json.dumps({{'code': code, 'modules': sorted(sys.modules)}}))
    """)


def test_rlab_help_imports_no_jax_gymnax_or_mlflow() -> None:
    out = _rlab(["--help"])
    assert out["code"] == 0
    top = {m.split(".")[0] for m in out["modules"]}
    assert not top & {"jax", "gymnax", "mlflow"}, sorted(top & {"jax", "gymnax", "mlflow"})
    assert not any(m.startswith("researchlab.examples") for m in out["modules"])


def test_rlab_upload_imports_no_gymnax() -> None:
    out = _rlab(["upload"])  # no spool file: argparse prints the usage, status 2
    assert out["code"] == 2
    top = {m.split(".")[0] for m in out["modules"]}
    assert "gymnax" not in top
    assert not any(m.startswith("researchlab.examples") for m in out["modules"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "researchlab.cli", "upload"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "usage: rlab upload" in res.stderr, res.stderr[-2000:]
