"""Build script: installs the `ppfr` package and builds its compiled kernels with CMake.

`kernels/` and `pipelines/` (fixed top-level folders) are installed as `ppfr.kernels` and `ppfr.pipelines`, and the
YAML files of `configs/` as `ppfr.configs`.

The compiled modules are torch-free pybind11 extensions (raw-pointer interface), so this script never imports
torch. That is what makes `python setup.py develop` work with setuptools >= 80, which re-routes `develop` to
`pip install -e .` in an isolated build environment where torch is absent: the isolated environment only needs
what pyproject.toml's [build-system] lists (setuptools, pybind11, cmake, ninja), all from PyPI.

Environment flags:
  PPFR_SKIP_CUDA_BUILD=1   never build the CUDA module
  FORCE_CUDA=1             build it, and fail if no CUDA compiler is found
  PPFR_CUDA_ARCHS="80;90"  CUDA architectures (default 80;90)
  PPFR_CPU_ARCH=native     -march for the CPU kernels ("" for a portable build)
  MAX_JOBS=N               parallel compile jobs (default: number of CPUs)
  PPFR_WERROR=0            do not treat compiler warnings as errors (default 1; a fallback for newer compilers)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_compiler() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _build_cuda() -> bool:
    if _flag("PPFR_SKIP_CUDA_BUILD"):
        print("ppfr: PPFR_SKIP_CUDA_BUILD set, building without the CUDA module")
        return False
    if _cuda_compiler() is None:
        if _flag("FORCE_CUDA"):
            raise RuntimeError("FORCE_CUDA=1 but no nvcc found (set CUDA_HOME or put nvcc on PATH)")
        print("ppfr: CUDA toolkit not found, building without the CUDA module")
        return False
    return True


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure + build all CMake targets once, into the directory setuptools expects the modules in."""

    def build_extensions(self) -> None:
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        want_cuda = any(e.name == "ppfr._C_cuda" for e in self.extensions)
        import pybind11  # a build requirement; imported here so `setup.py --help` works without it

        werror_off = os.environ.get("PPFR_WERROR", "1").strip().lower() in ("0", "false", "no", "off")

        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPPFR_OUTPUT_DIR={out_dir}",
            f"-DPPFR_CUDA={'ON' if want_cuda else 'OFF'}",
            f"-DPPFR_CPU_ARCH={os.environ.get('PPFR_CPU_ARCH', 'native')}",
            f"-DPPFR_CUDA_ARCHS={os.environ.get('PPFR_CUDA_ARCHS', '80;90')}",
            f"-DPPFR_WERROR={'OFF' if werror_off else 'ON'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]  # fmt: skip
        if want_cuda:
            cfg.append(f"-DCMAKE_CUDA_COMPILER={_cuda_compiler()}")
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(cfg, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)
        info = {"cuda_module": want_cuda, "cpu_arch": os.environ.get("PPFR_CPU_ARCH", "native"),
                "werror": not werror_off}
        (out_dir / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")


ext_modules = [CMakeExtension("ppfr._C")]
if _build_cuda():
    ext_modules.append(CMakeExtension("ppfr._C_cuda"))

setup(
    # configs/ ships as ppfr.configs (data only), so `ppfr train partialface_tiny` works from a wheel.
    packages=["ppfr", *(f"ppfr.{p}" for p in find_packages("ppfr")), "ppfr.kernels", "ppfr.pipelines", "ppfr.configs"],
    package_dir={"ppfr": "ppfr", "ppfr.kernels": "kernels", "ppfr.pipelines": "pipelines", "ppfr.configs": "configs"},
    package_data={"ppfr.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
