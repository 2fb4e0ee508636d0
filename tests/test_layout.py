"""The repository layout: the Triton kernels live in the top-level `kernels/` and are `mpo.kernels`;
the library's layers import only downwards.

`kernels` is also the import name of a PyPI package that transformers imports, so the folder has no
`__init__.py` (a namespace portion never shadows a regular package) and `mpo/kernels` links to it.
"""

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
KERNEL_FILES = sorted(p.name for p in KERNELS.glob("*.py"))


def test_kernels_folder_is_mpo_kernels():
    import mpo.kernels
    import mpo.kernels.lm_head

    assert "lm_head.py" in KERNEL_FILES and "reference.py" in KERNEL_FILES
    assert not (KERNELS / "__init__.py").exists(), "kernels/__init__.py would shadow the PyPI package `kernels`"
    assert (ROOT / "mpo" / "kernels").resolve() == KERNELS
    assert [Path(p).resolve() for p in mpo.kernels.__path__] == [KERNELS]
    assert Path(mpo.kernels.lm_head.__file__).resolve() == KERNELS / "lm_head.py"
    top_level = (importlib.metadata.distribution("mpo").read_text("top_level.txt") or "").split()
    assert "kernels" not in top_level


def _imported_modules(path: Path, package: str = "mpo.kernels") -> list[tuple[int, str, int]]:
    """(line, absolute module name, relative level) of every import in a file of `package`, the
    ones inside functions included; names imported from a package count as modules too
    (`from a import b` -> a and a.b)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            found.append((node.lineno, module, node.level))
            found += [(node.lineno, f"{module}.{alias.name}", node.level) for alias in node.names]
    return found


def _outside(path: Path) -> list[str]:
    """Imports that reach `mpo` outside `mpo.kernels`, or the top-level `kernels` (the PyPI package).
    Absolute `mpo.kernels.<module>` counts too: it runs `mpo/__init__.py`, i.e. the whole library;
    the kernels import each other relatively."""
    bad = []
    for line, module, level in _imported_modules(path):
        if level > 1 or (level == 0 and module.split(".")[0] in ("mpo", "kernels")):
            bad.append(f"kernels/{path.name}:{line}: {module}")
    return bad


def test_kernels_import_nothing_of_mpo_outside_themselves():
    """The kernels know nothing of models or the library: of `mpo`, only `mpo.kernels` itself."""
    bad = [b for name in KERNEL_FILES for b in _outside(KERNELS / name)]
    assert not bad, "\n".join(bad)


def test_the_import_check_can_fail(tmp_path):
    allowed = ("from .config import TileConfig", "from . import tl_math", "import torch", "import triton.language")
    refused = ("from mpo.losses import x", "from .. import losses", "import mpo", "from mpo import kernels",
               "from mpo.kernels import config", "import kernels", "from kernels import lm_head")
    for source in allowed + refused:
        (tmp_path / "k.py").write_text(source + "\n")
        assert bool(_outside(tmp_path / "k.py")) == (source in refused), source


def test_transformers_imports_the_pypi_kernels_from_the_checkout_root():
    """`python -c` (like `python -m pytest` and `python -m mpo`) puts the checkout root first on
    sys.path, where the folder `kernels/` lies."""
    code = ("import sys, kernels, transformers.integrations.hub_kernels, mpo.kernels.lm_head; "
            "assert sys.path[0] == '', sys.path[0]; "
            "assert 'site-packages' in kernels.__file__ or 'dist-packages' in kernels.__file__, kernels.__file__")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_wheel_carries_the_kernels_inside_mpo(tmp_path):
    """Build a wheel from a copy of the sources (the build writes build/ next to setup.py, so not in
    the checkout) and check it holds every kernel file, with the checkout's contents, under
    mpo/kernels/ and nothing at a top-level kernels/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("csrc", "kernels", "mpo"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    assert (src / "mpo" / "kernels").is_symlink()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", ".", "-w", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("mpo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        shipped = sorted(n.split("/")[-1] for n in names if n.startswith("mpo/kernels/") and n.endswith(".py"))
        assert shipped == KERNEL_FILES
        for name in KERNEL_FILES:
            assert zf.read(f"mpo/kernels/{name}") == (KERNELS / name).read_bytes(), name
        assert not [n for n in names if n.startswith("kernels/")]
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["mpo"]


# The library's layers, lowest first: a module may import its own package and lower layers only.
# Same-layer packages are peers that know nothing of each other (the trainer and the pair builders).
LAYERS = (
    ("mpo.atomic", "mpo.errors", "mpo._native", "mpo.kernels"),
    ("mpo.logprobs", "mpo.losses", "mpo.distributed"),
    ("mpo.mpo_loss", "mpo.sequences"),
    ("mpo",),  # the public API in mpo/__init__.py
    ("mpo.families",),
    ("mpo.data",),
    ("mpo.models",),
    ("mpo.generation",),
    ("mpo.pairs", "mpo.train"),
    ("mpo.cli",),
    ("mpo.__main__",),
)


def _unit(module: str) -> tuple[str, int] | None:
    """(package or module of LAYERS, its layer) that `module` belongs to; None outside mpo."""
    best = None
    for layer, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[0])):
                best = (unit, layer)
    return best


def _upward_imports(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        package = module if relative.name == "__init__" else module.rpartition(".")[0]
        unit, layer = _unit(module)
        for line, target, _ in _imported_modules(path, package):
            if _unit(target) is None:
                continue  # not mpo
            target_unit, target_layer = _unit(target)
            if target_unit == unit or target_layer < layer:
                continue
            if target_unit == "mpo" and target != "mpo":
                continue  # `from mpo import x` names the module mpo.x, checked on its own
            bad.append(f"{path.relative_to(root.parent)}:{line}: {unit} (layer {layer}) imports {target} "
                       f"(layer {target_layer})")
    return bad


def test_every_module_has_a_layer():
    for path in (ROOT / "mpo").rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        assert _unit(module) is not None, module


def test_layers_import_only_downwards():
    bad = _upward_imports(ROOT / "mpo")
    assert not bad, "\n".join(bad)


def test_the_layer_check_can_fail(tmp_path):
    (tmp_path / "mpo" / "data").mkdir(parents=True)
    (tmp_path / "mpo" / "families").mkdir()
    (tmp_path / "mpo" / "data" / "render.py").write_text("import torch\nfrom mpo.families import family_of\n")
    (tmp_path / "mpo" / "families" / "base.py").write_text("def f():\n    from mpo.data.records import Rejects\n")
    (tmp_path / "mpo" / "train").mkdir()
    (tmp_path / "mpo" / "train" / "x.py").write_text("from mpo.pairs import run\nfrom . import config\n")
    assert _upward_imports(tmp_path / "mpo") == [
        "mpo/families/base.py:2: mpo.families (layer 4) imports mpo.data.records (layer 5)",
        "mpo/families/base.py:2: mpo.families (layer 4) imports mpo.data.records.Rejects (layer 5)",
        "mpo/train/x.py:1: mpo.train (layer 8) imports mpo.pairs (layer 8)",
        "mpo/train/x.py:1: mpo.train (layer 8) imports mpo.pairs.run (layer 8)",
    ]
