"""Register MM-Rec with transformers and lm_eval as soon as they are imported, without importing them.

`import mm_rec` calls `install()`. For each library below that is installed:

* already imported: its integration registers now;
* not yet imported: a finder at the front of `sys.meta_path` waits for its import and, once the
  library's own `__init__` has run, imports the integration, which registers itself (for
  transformers: "mmrec" with AutoConfig, AutoModelForCausalLM and AutoTokenizer; for lm_eval: the
  `mmrec` model). The finder then removes itself.

So `import mm_rec` stays as cheap as before (importing transformers' config machinery alone takes
~0.7 s), and `AutoModelForCausalLM.from_pretrained(folder)` works whichever of the two is imported
first. A registration that fails (say, a transformers too old for the integration) warns and
leaves the library usable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

# library -> the integration module that registers with it on import
INTEGRATIONS = {"transformers": "mm_rec.integrations.hf", "lm_eval": "mm_rec.integrations.lm_eval"}


def install() -> None:
    """Register now with the libraries already imported; wait for the others (if installed)."""
    for library in INTEGRATIONS:
        if library in sys.modules:
            _register(library)
        elif _installed(library) and not any(isinstance(f, _RegisterOnImport) and f.library == library
                                             for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterOnImport(library))


def _installed(library: str) -> bool:
    try:
        return importlib.util.find_spec(library) is not None
    except (ImportError, ValueError):  # a broken installation, or sys.modules[library] set to None
        return False


def _register(library: str) -> None:
    try:
        # the integration registers itself when imported (import time is its only reason to be deferred)
        if library == "transformers":
            import mm_rec.integrations.hf  # noqa: F401
        else:
            import mm_rec.integrations.lm_eval  # noqa: F401
    except Exception as err:  # an incompatible version must not break the library for its other users
        warnings.warn(f"mm_rec: could not register with {library}: {type(err).__name__}: {err}", stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader of `library`'s top-level module so that
    `_register(library)` runs right after the module has executed."""

    def __init__(self, library: str):
        self.library = library

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.library:
            return None
        sys.meta_path.remove(self)  # once only; and the search below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self.library)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """A module loader that registers MM-Rec after the wrapped loader has executed the module."""

    def __init__(self, loader, library: str):
        self.loader, self.library = loader, library

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register(self.library)

    def __getattr__(self, name):  # resource readers and the like: the wrapped loader's
        return getattr(self.loader, name)
