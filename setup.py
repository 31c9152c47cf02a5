"""Build longattn._C with CMake (a CMakeExtension + build_ext pair).

Environment knobs:
  LONGATTN_CUDA=0|1        skip / require the CUDA backend (default: build it when nvcc is found)
  LONGATTN_CUDA_ARCHS      CUDA archs, default "80;90a" (plus PTX of the newest portable arch)
  LONGATTN_FWD_STRIPS      flash forward layout for head dims <= 128: 2 (default) or 1 (tuning)
  LONGATTN_SPARSE_FWD_2STRIP_DP  block-sparse forward: largest head-dim bucket with two query
                           strips per warp, 64 (default), 0, 32, 96 or 128 (tuning)
  LONGATTN_BUILD_JOBS      parallel compile jobs (default: CPU count)
  LONGATTN_BUILD_TYPE      CMake build type (default Release)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("LONGATTN_CUDA", "").strip().lower()
        cuda_mode = {"": "AUTO", "auto": "AUTO", "1": "ON", "on": "ON", "0": "OFF", "off": "OFF"}.get(cuda)
        if cuda_mode is None:
            raise ValueError(f"LONGATTN_CUDA must be 0, 1 or unset, got {cuda!r}")
        args = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LONGATTN_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLONGATTN_CUDA={cuda_mode}",
        ]
        if os.environ.get("LONGATTN_CUDA_ARCHS"):
            args.append(f"-DLONGATTN_CUDA_ARCHS={os.environ['LONGATTN_CUDA_ARCHS']}")
        # Always passed, so a rebuild without the knob returns to the default layout.
        args.append(f"-DLONGATTN_FWD_STRIPS={os.environ.get('LONGATTN_FWD_STRIPS') or 2}")
        args.append(f"-DLONGATTN_SPARSE_FWD_2STRIP_DP={os.environ.get('LONGATTN_SPARSE_FWD_2STRIP_DP') or 64}")
        subprocess.run(args, check=True)
        jobs = os.environ.get("LONGATTN_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("longattn._C")], cmdclass={"build_ext": CMakeBuild})
