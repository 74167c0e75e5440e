"""Builds carsvc's two Cython hot paths; everything else is in pyproject.toml.

Environment switches (any non-empty value other than "0" turns one on):

* ``CARSVC_NO_EXTENSIONS``: build nothing; a pure-Python install.
* ``CARSVC_DEBUG_BUILD``: ``-O0 -g``, Cython line tracing (``linetrace``,
  ``CYTHON_TRACE``/``CYTHON_TRACE_NOGIL``, for coverage and profilers) and an
  annotated HTML next to the generated C under ``build/cython-debug/``.

Generated C goes to ``build/cython-{release,debug}/`` (one directory per mode,
so switching modes always regenerates it) and is never committed.
See docs/hot-paths.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys

from setuptools import Extension, setup

CYTHON_MIN = (3, 1)
# ext/<stem>.pyx (+ ext/<stem>.pxd) -> carsvc.domain.<stem>
MODULES = {"_overlay": "carsvc.domain._overlay", "_budget": "carsvc.domain._budget"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _banner(text: str) -> None:
    print(f"*** carsvc: {text} ***", flush=True)


def _stage_own_pxds(build_dir: str) -> str:
    """Make ext/<stem>.pxd findable as the .pxd of module carsvc.domain.<stem>.

    Cython pairs a module with its own .pxd by qualified name: it looks for
    carsvc/domain/<stem>.pxd on the include path, never for ext/<stem>.pxd.
    Copy (keeping mtimes, so Cython's dependency check still works) each one
    to <build_dir>/pxd/carsvc/domain/ and put that on the include path. The
    sources stay in ext/; edit those, never the copies.
    """
    root = os.path.join(build_dir, "pxd")
    for stem, module in MODULES.items():
        target = os.path.join(root, *module.split(".")[:-1], f"{stem}.pxd")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join("ext", f"{stem}.pxd"), target)
    return root


def _extensions() -> list[Extension]:
    if _env_flag("CARSVC_NO_EXTENSIONS"):
        _banner("pure-Python build (CARSVC_NO_EXTENSIONS is set; no extensions compiled)")
        return []
    if platform.python_implementation() != "CPython":
        _banner(f"pure-Python build ({platform.python_implementation()} is not CPython)")
        return []

    try:
        import Cython
        from Cython.Build import cythonize
    except ImportError:
        sys.exit(
            "carsvc: building the extensions needs Cython>=3.1 "
            "(or set CARSVC_NO_EXTENSIONS=1 for a pure-Python install)"
        )
    version = tuple(int(part) for part in Cython.__version__.split(".")[:2] if part.isdigit())
    if version < CYTHON_MIN:
        sys.exit(f"carsvc: Cython>=3.1 is required, found {Cython.__version__}")

    debug = _env_flag("CARSVC_DEBUG_BUILD")
    directives: dict[str, object] = {"language_level": 3, "embedsignature": True}
    macros: list[tuple[str, str | None]] = []
    if debug:
        directives["linetrace"] = True
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
        cflags = ["-O0", "-g3", "-UNDEBUG"]
    else:
        cflags = []  # the interpreter's own optimisation flags (-O3 -DNDEBUG here)

    mode = "debug" if debug else "release"
    build_dir = os.path.join("build", f"cython-{mode}")
    common = {
        "include_dirs": ["ext/include"],
        "define_macros": macros,
        "extra_compile_args": cflags,
        "depends": ["ext/include/carsvc_atomic.h", "ext/_atomic.pxd"],
    }
    extensions = [
        Extension(module, [f"ext/{stem}.pyx"], **common)  # type: ignore[arg-type]
        for stem, module in MODULES.items()
    ]
    modules = ", ".join(MODULES.values())
    _banner(f"accelerated {mode} build (Cython {Cython.__version__}: {modules})")
    return cythonize(
        extensions,
        include_path=["ext", _stage_own_pxds(build_dir)],
        build_dir=build_dir,
        compiler_directives=directives,
        annotate=debug,
        quiet=True,
    )


setup(ext_modules=_extensions())
