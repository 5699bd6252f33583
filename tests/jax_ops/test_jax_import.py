"""mm_rec.jax without JAX installed: a clear ImportError naming the extra. Runs whether or not
JAX is installed (an import of jax is made to fail here)."""

import importlib
import sys

import pytest


def test_without_jax_the_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError
    for name in [m for m in sys.modules if m == "mm_rec.jax" or m.startswith("mm_rec.jax.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    with pytest.raises(ImportError, match=r"pip install mm-rec\[jax\]"):
        importlib.import_module("mm_rec.jax")
    import mm_rec  # the package itself does not need JAX

    assert callable(mm_rec.associative_scan_exponential)
