"""Packaging: the kernels are only ever `hf_paged.kernels`, in a checkout and in a wheel.

* The repository has no top-level ``kernels`` folder: with the root on ``sys.path`` (``python -c`` or
  ``python -m pytest`` run there) it would be found as the top-level module ``kernels``, which Transformers imports
  while probing for the Hub's ``kernels`` package (a dependency of Transformers from 5.25), and import would break.
* A built wheel holds ``hf_paged/kernels/*`` (and every other subpackage), no top-level ``kernels``, and imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


def test_built_wheel_installs_into_a_venv_and_generates(tmp_path):
    """The wheel, ``pip install``-ed into a new venv (that sees this interpreter's torch and Transformers), imports
    from the venv, declares the supported range, and a tiny model generates with "hf_paged"."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    code = (
        "import sys, importlib.metadata as md, torch\n"
        "import hf_paged\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "assert hf_paged.__file__.startswith(sys.prefix), hf_paged.__file__\n"
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
    run = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=environ, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr[-4000:]
