"""Configure and build ``usfm_host`` with CMake against the OpenVINO runtime inside the ``openvino`` pip wheel.

    python examples/cpp_host/build_host.py [--build-dir build/cpp_host]      # prints the executable's path

The same as the two cmake commands in ``CMakeLists.txt``; ``tests/test_cpp_host.py`` and
``benchmarks/bench_cpp_host.py`` build through :func:`build_host`, and skip with :func:`missing_tools`'s reason.
Needs cmake, a C++17 compiler, nlohmann-json and OpenSSL headers (Debian: ``apt-get install cmake g++
nlohmann-json3-dev libssl-dev``) and ``pip install openvino`` (the wheel carries the headers and
``OpenVINOConfig.cmake``). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXE = "usfm_host"


def openvino_cmake_dir() -> Path | None:
    """``<site-packages>/openvino/cmake`` when the installed wheel ships the C++ SDK (headers + CMake config)."""
    try:
        import openvino
    except ImportError:
        return None
    root = Path(openvino.__file__).resolve().parent
    ok = (root / "cmake" / "OpenVINOConfig.cmake").is_file() and (root / "include" / "openvino" / "openvino.hpp").is_file()
    return root / "cmake" if ok else None


def _prefixes() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("CMAKE_PREFIX_PATH", "").split(os.pathsep) if p]
    return [*extra, Path("/usr"), Path("/usr/local"), Path(sys.prefix)]


def _has_nlohmann_json() -> bool:
    patterns = ("share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake", "lib/cmake/nlohmann_json/nlohmann_jsonConfig.cmake",
                "lib64/cmake/nlohmann_json/nlohmann_jsonConfig.cmake", "lib/*/cmake/nlohmann_json/nlohmann_jsonConfig.cmake",
                "share/nlohmann_json/cmake/nlohmann_jsonConfig.cmake")
    return any(any(p.glob(pat)) for p in _prefixes() for pat in patterns)


def _has_openssl() -> bool:
    roots = [Path(os.environ["OPENSSL_ROOT_DIR"])] if os.environ.get("OPENSSL_ROOT_DIR") else []
    return any((p / "include" / "openssl" / "evp.h").is_file() for p in [*roots, *_prefixes()])


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return next((shutil.which(c) for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def missing_tools() -> str | None:
    """Why the host cannot be built here (the exact missing piece and its package), or None when it can."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake (apt-get install cmake)")
    if not _compiler():
        missing.append("a C++17 compiler (apt-get install g++)")
    if not _has_nlohmann_json():
        missing.append("nlohmann-json's CMake package (apt-get install nlohmann-json3-dev)")
    if not _has_openssl():
        missing.append("OpenSSL headers openssl/evp.h (apt-get install libssl-dev)")
    if openvino_cmake_dir() is None:
        missing.append("the OpenVINO C++ SDK inside the openvino wheel (pip install openvino: openvino/include and "
                       "openvino/cmake/OpenVINOConfig.cmake)")
    return "cannot build the C++ host: missing " + "; ".join(missing) if missing else None


def build_host(build_dir: str | Path, jobs: int = 2, source: Path = HERE) -> Path:
    """Configure (Release) and build; returns the ``usfm_host`` executable.

    Raises:
        RuntimeError: a tool is missing (``missing_tools``) or CMake/the compiler failed (with its output's tail).
    """
    reason = missing_tools()
    if reason:
        raise RuntimeError(reason)
    build_dir = Path(build_dir)
    steps = [["cmake", "-S", str(source), "-B", str(build_dir), f"-DOpenVINO_DIR={openvino_cmake_dir()}",
              "-DCMAKE_BUILD_TYPE=Release"],
             ["cmake", "--build", str(build_dir), "-j", str(int(jobs))]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    exe = build_dir / EXE
    if not exe.is_file():
        raise RuntimeError(f"the build finished without {exe}")
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default="build/cpp_host")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        print(build_host(args.build_dir, args.jobs))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
