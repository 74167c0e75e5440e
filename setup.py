"""Builds carsvc's two Cython hot paths; everything else is in pyproject.toml.

Environment switches (any non-empty value other than "0" turns one on):

* ``CARSVC_NO_EXTENSIONS``: build nothing; a pure-Python install.
* ``CARSVC_DEBUG_BUILD``: ``-O0 -g3``, Cython line tracing (``linetrace``,
  ``CYTHON_TRACE``/``CYTHON_TRACE_NOGIL``, for coverage and profilers) and an
  annotated HTML beside the generated C, in ``build/cython-debug/ext/``.

Works with ``pip install .`` (build isolation brings setuptools and Cython),
``pip install -e .`` and ``python setup.py build_ext --inplace``. Cython runs
inside ``build_ext`` only, so metadata hooks never need it. Generated C goes
to ``build/cython-{release,debug}/`` (one directory per mode, so switching
modes always regenerates it) and is never committed. See docs/hot-paths.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

CYTHON_MIN = (3, 1)
# ext/<stem>.pyx + ext/<stem>.pxd -> module carsvc.domain.<stem>
MODULES = {"_overlay": "carsvc.domain._overlay", "_budget": "carsvc.domain._budget"}
SHARED_DEPENDS = ["ext/_atomic.pxd", "ext/include/carsvc_atomic.h"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _banner(text: str) -> None:
    print(f"*** carsvc: {text} ***", flush=True)


NO_EXTENSIONS = _env_flag("CARSVC_NO_EXTENSIONS")
DEBUG_BUILD = _env_flag("CARSVC_DEBUG_BUILD")
MODE = "debug" if DEBUG_BUILD else "release"
BUILD_DIR = os.path.join("build", f"cython-{MODE}")


def _stage_own_pxds() -> str:
    """Make ext/<stem>.pxd findable as the .pxd of module carsvc.domain.<stem>.

    Cython pairs a module with its own .pxd by qualified name: it looks for
    carsvc/domain/<stem>.pxd on the include path, never for ext/<stem>.pxd.
    Copy (keeping mtimes, so Cython's dependency check still works) each one
    to <build dir>/pxd/carsvc/domain/ and put that on the include path. The
    sources stay in ext/; edit those, never the copies.
    """
    root = os.path.join(BUILD_DIR, "pxd")
    for stem, module in MODULES.items():
        target = os.path.join(root, *module.split(".")[:-1], f"{stem}.pxd")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join("ext", f"{stem}.pxd"), target)
    return root


class build_ext(_build_ext):
    """Cythonizes ext/*.pyx when it runs, then compiles as usual.

    Not in finalize_options: sdist calls that too, and must ship the .pyx.
    """

    @staticmethod
    def _cythonize(extensions: list[Extension]) -> Any:
        try:
            import Cython
            from Cython.Build import cythonize
        except ImportError:
            sys.exit(
                "carsvc: building the extensions needs Cython>=3.1 "
                "(or set CARSVC_NO_EXTENSIONS=1 for a pure-Python install)"
            )
        version = tuple(int(p) for p in Cython.__version__.split(".")[:2] if p.isdigit())
        if version < CYTHON_MIN:
            sys.exit(f"carsvc: Cython>=3.1 is required, found {Cython.__version__}")
        directives: dict[str, object] = {"language_level": 3, "embedsignature": True}
        if DEBUG_BUILD:
            directives["linetrace"] = True
        return cythonize(
            extensions,
            include_path=["ext", _stage_own_pxds()],
            build_dir=BUILD_DIR,
            compiler_directives=directives,
            annotate=DEBUG_BUILD,
            quiet=True,
        )

    def run(self) -> None:
        if self.extensions and any(
            source.endswith(".pyx") for ext in self.extensions for source in ext.sources
        ):
            # Keep setuptools' finalized Extension objects; take only the
            # generated C sources from cythonize's copies.
            generated = {ext.name: ext.sources for ext in self._cythonize(self.extensions)}
            for ext in self.extensions:
                ext.sources = generated[ext.name]
            import Cython

            modules = ", ".join(MODULES.values())
            _banner(f"accelerated {MODE} build (Cython {Cython.__version__}: {modules})")
        # Each mode keeps its own up-to-date C, so timestamps alone would not
        # rebuild the .so after a switch between release and debug.
        stamp = os.path.join("build", "cython-last-mode")
        try:
            with open(stamp, encoding="utf-8") as f:
                last_mode = f.read().strip()
        except OSError:
            last_mode = ""
        if last_mode != MODE:
            self.force = True
        super().run()
        os.makedirs("build", exist_ok=True)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(MODE)


def _extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        _banner("pure-Python build (CARSVC_NO_EXTENSIONS is set; no extensions compiled)")
        return []
    if platform.python_implementation() != "CPython":
        _banner(f"pure-Python build ({platform.python_implementation()} is not CPython)")
        return []
    macros: list[tuple[str, str | None]] = []
    if DEBUG_BUILD:
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
        cflags = ["-O0", "-g3", "-UNDEBUG"]
    else:
        cflags = []  # the interpreter's own optimisation flags (-O3 -DNDEBUG on CPython)
    return [
        Extension(
            module,
            [f"ext/{stem}.pyx"],
            include_dirs=["ext/include"],
            define_macros=macros,
            extra_compile_args=cflags,
            # Listed so that they are rebuilt on change and shipped in the sdist.
            depends=[f"ext/{stem}.pxd", *SHARED_DEPENDS],
        )
        for stem, module in MODULES.items()
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": build_ext})
