"""Install script. `kernels/` ships as `mpo.kernels`: a top-level `kernels` module would shadow an
unrelated PyPI package that transformers probes for."""

from setuptools import find_packages, setup

setup(
    name="mpo",
    version="0.1.0",
    description="Mixed Preference Optimization for (multimodal) language models, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mpo", "mpo.*"]) + ["mpo.kernels"],
    package_dir={"mpo.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        # The fused kernels; CUDA builds of torch already bring it. On CPU it runs the kernels only
        # under TRITON_INTERPRET=1 (the tests), the PyTorch path serves everything else.
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # Other fused implementations measured against in bench/ (they need CUDA to run).
        "bench": ["trl", "liger-kernel", "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["mpo = mpo.cli:main"]},
    license="Apache-2.0",
)
