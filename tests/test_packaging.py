"""Packaging: the kernels are only ever `hf_paged.kernels`, in a checkout and in a wheel.

* The repository has no top-level ``kernels`` folder: with the root on ``sys.path`` (``python -c`` or
  ``python -m pytest`` run there) it would be found as the top-level module ``kernels``, which Transformers imports
  while probing for the Hub's ``kernels`` package (a dependency of Transformers from 5.25), and import would break.
* A built wheel holds ``hf_paged/kernels/*`` (and every other subpackage), no top-level ``kernels``, and imports.
* The package's layout stays as CONTRIBUTING.md draws it: no circle among its modules' imports, and no module past
  its line budget (a module that keeps growing is split in the change that grows it).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("first", ["transformers.activations", "hf_paged"])
def test_imports_from_the_repository_root(first, root=ROOT):
    # Importing Transformers first is what used to crash (its probe imported a folder of this checkout); hf_paged too.
    assert not (root / "kernels").exists()
    code = (
        f"import {first}\n"
        "import importlib.util, sys\n"
        "import hf_paged\n"
        "import hf_paged.kernels as real\n"
        "import transformers.activations\n"
        "import transformers.integrations.hub_kernels\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        "spec = importlib.util.find_spec('kernels')  # None, or the Hub's package if installed: never this checkout\n"
        "assert spec is None or not str(spec.origin).startswith(sys.argv[1] + '/kernels/'), spec\n"
        "assert real.__name__ == 'hf_paged.kernels' and callable(real.paged_attention)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(root)], cwd=root, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr[-4000:]


#: Lines a module of hf_paged may hold (about 550, the redesign's budget), and the two modules allowed more: the
#: PyTorch reference of every op and the block manager, each one noun that splitting would scatter.
LINE_BUDGET = 560
OVER_BUDGET = {"hf_paged/ops.py", "hf_paged/block_manager.py"}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted name: file} of every module of hf_paged (a package by its name, its ``__init__.py`` as the file)."""
    modules = {}
    for path in sorted((root / "hf_paged").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _run_time_imports(node: ast.AST):
    """The import statements under `node` that run when its module runs: ``if TYPE_CHECKING:`` blocks left out,
    functions' lazy imports in."""
    for child in ast.iter_child_nodes(node):
        type_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
        for statement in child.orelse if type_only else [child]:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                yield statement
            else:
                yield from _run_time_imports(statement)


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The modules of hf_paged that `node`, in module `name` at `path`, imports (a name a package defines counts
    as the package)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return found & modules.keys()


def _import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the other modules of hf_paged it imports when it runs, functions' lazy imports included}."""
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {target for node in _run_time_imports(tree)
                       for target in _imported(name, path, node, modules)} - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each a circle of imports), sorted."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(circles)


def test_modules_import_one_another_without_a_circle():
    graph = _import_graph()
    # The reader sees the imports: the attention reaches the switch, the switch's lazy import reaches the kernels.
    assert "hf_paged.backend" in graph["hf_paged.attention"] and "hf_paged.kernels" in graph["hf_paged.backend"]
    assert _circles(graph) == [], "hf_paged's modules import one another in a circle: move what both need down"


def test_the_circle_finder_sees_a_circle_through_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "hf_paged"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = _import_graph(tmp_path)
    assert graph["hf_paged.c"] == set()  # a type-only import is no circle
    assert _circles(graph) == [["hf_paged.a", "hf_paged.sub.b"]]


def test_no_module_outgrows_its_line_budget():
    over = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in _modules().values()}
    over = {name: lines for name, lines in over.items() if lines > LINE_BUDGET and name not in OVER_BUDGET}
    assert over == {}, f"modules over {LINE_BUDGET} lines: split them (CONTRIBUTING.md, Layout)"


def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel into `tmp_path` from a copy, so the checkout gets no build/ or egg-info and concurrent edits
    do not matter."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "hf_paged", source / "hf_paged", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("hf_paged-*.whl")
    return wheel


def test_wheel_contains_the_kernels_subpackage_and_no_top_level_kernels(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        top_level = archive.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
        archive.extractall(tmp_path / "site")

    assert top_level == ["hf_paged"]
    assert not any(name.startswith("kernels/") for name in names), sorted(names)
    assert {name.split("/")[0] for name in names} == {"hf_paged", wheel.name.split("-py")[0] + ".dist-info"}
    expected = {f"hf_paged/{path.relative_to(ROOT / 'hf_paged').as_posix()}"
                for path in (ROOT / "hf_paged").rglob("*.py")}  # subpackages (hf_paged.kernels, .bench) too
    assert expected <= names, sorted(expected - names)

    # The unpacked wheel imports, and wins over the editable install (its finder comes after sys.path).
    site = tmp_path / "site"
    code = (
        "import sys\n"
        "import importlib.util\n"
        "import hf_paged, hf_paged.bench, hf_paged.kernels as k\n"
        "for module in (hf_paged, hf_paged.bench, k):\n"
        "    assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
        "assert k.HAS_TRITON == (k.TRITON_PROBLEM is None) and callable(k.paged_attention)\n"
        "spec = importlib.util.find_spec('kernels')  # None, or the Hub's package if installed: never ours\n"
        "assert spec is None or not spec.origin.startswith(sys.argv[1]), spec\n"
        "print('ok')\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=environ, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr[-4000:]


MAKE_VENV = ROOT / "scripts" / "make_venv.py"


def test_a_venv_made_inside_a_venv_sees_the_outer_venvs_packages(tmp_path):
    """scripts/make_venv.py (what this file's wheel test and scripts/test_versions.sh use): the new venv sees the
    packages of the environment that made it, here an isolated venv holding a package the base interpreter lacks,
    with that environment's .pth files, and nothing of the base interpreter that the outer venv does not see.
    A ``--system-site-packages`` venv sees the base interpreter's packages instead: that is what broke
    ``bash scripts/test.sh`` inside a venv."""
    outer = tmp_path / "outer"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(outer)], check=True, timeout=300)
    outer_python = outer / "bin" / "python"
    site_dir = Path(subprocess.run([str(outer_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (site_dir / "only_in_outer").mkdir()
    (site_dir / "only_in_outer" / "__init__.py").write_text("WHERE = 'outer'\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "added_by_outer_pth.py").write_text("WHERE = 'pth'\n")
    (site_dir / "extra.pth").write_text(f"{tmp_path / 'extra'}\n")
    pytest_in_base = subprocess.run([sys.executable, "-c", "import pytest"], capture_output=True).returncode == 0

    code = ("import importlib.util, sys, only_in_outer, added_by_outer_pth\n"
            "assert only_in_outer.__file__.startswith(sys.argv[1]), only_in_outer.__file__\n"
            "print(importlib.util.find_spec('pytest') is None)\n")
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    maker = outer_python
    for name in ("inner", "innermost"):  # a venv made in the outer venv, then one made in that one
        subprocess.run([str(maker), str(MAKE_VENV), str(tmp_path / name), "--without-pip"], check=True, timeout=300)
        maker = tmp_path / name / "bin" / "python"
        run = subprocess.run([str(maker), "-c", code, str(site_dir)], capture_output=True, text=True, timeout=300,
                             env=environ)
        assert run.returncode == 0, run.stderr[-4000:]
        # The base interpreter's pytest stays invisible, as it is to the isolated outer venv.
        assert not pytest_in_base or run.stdout.strip() == "True", run.stdout

    # Made again on the same folder: reused, and still right.
    subprocess.run([str(outer_python), str(MAKE_VENV), str(tmp_path / "inner"), "--without-pip"], check=True,
                   timeout=300)
    run = subprocess.run([str(tmp_path / "inner" / "bin" / "python"), "-c", code, str(site_dir)], env=environ,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]


def test_built_wheel_installs_into_a_venv_and_generates(tmp_path):
    """The wheel, ``pip install``-ed into a new venv that sees this interpreter's packages (scripts/make_venv.py:
    the same torch and Transformers as here, also when this interpreter is itself a venv), imports from the venv,
    declares the supported range, and a tiny model generates with "hf_paged"."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, str(MAKE_VENV), str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    code = (
        "import sys, importlib.metadata as md, torch, transformers\n"
        "import hf_paged\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "assert hf_paged.__file__.startswith(sys.prefix), hf_paged.__file__\n"
        "assert (torch.__file__, transformers.__file__) == tuple(sys.argv[1:3]), (torch.__file__, transformers.__file__)\n"
        "requires = md.requires('hf-paged')\n"
        "assert 'transformers>=5.0' in requires and not any('<' in r for r in requires if 'transformers' in r)\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                     num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)\n"
        "torch.manual_seed(0)\n"
        "ref = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa').eval()\n"
        "paged = AutoModelForCausalLM.from_config(config, attn_implementation='hf_paged').eval()\n"
        "paged.load_state_dict(ref.state_dict())\n"
        "ids = torch.randint(3, 60, (2, 7))\n"
        "kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)\n"
        "assert torch.equal(ref.generate(ids, **kw), paged.generate(ids, **kw))\n"
        "print('ok')\n"
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    environ["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([str(python), "-c", code, torch.__file__, transformers.__file__], cwd=tmp_path, env=environ,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr[-4000:]
