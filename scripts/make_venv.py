"""Make a virtual environment that sees the packages of the Python running this script, venv or not.

    python scripts/make_venv.py DIR [--without-pip]

What is installed into DIR comes first; after it, the venv sees this interpreter's site directories (and what their
``.pth`` files add), so it reuses torch, Triton and pytest without installing them again. ``--system-site-packages``
alone is not enough: a venv made from inside another venv gets the *base* interpreter's packages, not the outer
venv's. Here the venv is made without them, and a ``.pth`` file in its site-packages adds this interpreter's own
site directories (``site.getsitepackages()``, and the user site where it is enabled) with ``site.addsitedir``, as
Python does for a system site. A DIR that exists is reused when it was made by this script for the same Python
version (its ``.pth`` is rewritten, so it follows the environment that runs the script now), and made again otherwise.
"""

from __future__ import annotations

import argparse
import site
import subprocess
import sys
import venv
from pathlib import Path

# Sorts after the venv's own .pth files (editable installs into the venv keep their place before ours).
PTH_NAME = "zz-outer-environment.pth"


def outer_site_dirs() -> list[str]:
    """This interpreter's site directories, in the order its ``site`` module added them (user site first)."""
    dirs = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    dirs += site.getsitepackages()
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _reusable(target: Path, with_pip: bool) -> bool:
    cfg = target / "pyvenv.cfg"
    if not (target / "bin" / "python").exists() or not cfg.exists():
        return False
    if with_pip and not (target / "bin" / "pip").exists():
        return False
    values = dict(line.split("=", 1) for line in cfg.read_text().splitlines() if "=" in line)
    values = {key.strip(): value.strip() for key, value in values.items()}
    version = ".".join(map(str, sys.version_info[:3]))
    return values.get("include-system-site-packages") == "false" and values.get("version") == version


def make_venv(target: Path, with_pip: bool = True) -> Path:
    """Make (or reuse) the venv at `target` and point it at this interpreter's site directories; returns its python."""
    if target.exists() and not (target / "pyvenv.cfg").exists() and any(target.iterdir()):
        raise SystemExit(f"make_venv: {target} exists and is not a venv; name a new or empty folder.")
    if not _reusable(target, with_pip):
        venv.EnvBuilder(clear=target.exists(), with_pip=with_pip, system_site_packages=False).create(target)
    python = target / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in outer_site_dirs())
    (Path(purelib) / PTH_NAME).write_text(f"# Added by hf_paged's scripts/make_venv.py for {sys.executable}\n{lines}")
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="the venv's folder")
    parser.add_argument("--without-pip", action="store_true", help="do not install pip into the venv")
    args = parser.parse_args(argv)
    make_venv(args.target.absolute(), with_pip=not args.without_pip)


if __name__ == "__main__":
    main()
