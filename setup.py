"""srdit: installable with `pip install -e .`.

csrc/ is compiled as a CUDA extension only when CUDA (nvcc + a CUDA build of torch) is present
and csrc/ holds sources; otherwise the package is pure Python.
"""
import glob
import os

from setuptools import find_packages, setup


def cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    ext = CUDAExtension("srdit._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="srdit",
    version="0.1.0",
    description="Fast, exact training of SR-DiT (Speedrunning ImageNet Diffusion)",
    packages=find_packages(include=["srdit", "srdit.*"]),
    python_requires=">=3.10",
    # torch is deliberately not listed: a bare `torch` requirement pulls a multi-GB CUDA build.
    # Install a pinned torch first (README); the GPU machines bring their own.
    install_requires=["numpy", "pyyaml", "tqdm", "pillow", "scipy"],
    extras_require={
        "test": ["pytest", "timm", "scikit-learn", "nvidia-dali-cuda130==2.4.0"],
        "dali": ["nvidia-dali-cuda130"],
        "telemetry": ["nvidia-ml-py", "wandb"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
