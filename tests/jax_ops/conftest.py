"""The JAX tests' cost is XLA compile time: each scan shape compiles in seconds on a CPU.
LLVM's optimization level 0 compiles them about 3x faster; results differ from the default
level's by an fp32 ulp at most (measured on a forward+backward at [2, 300, 33]: relative 2e-8),
far below the tests' 1e-5. Set here, before any test module imports jax (XLA reads the flags
when its CPU backend starts), unless XLA_FLAGS already names a level: to test at the default
level, run `XLA_FLAGS=--xla_backend_optimization_level=2 pytest tests/jax_ops`."""

import os
import sys

flags = os.environ.get("XLA_FLAGS", "")
if "jax" not in sys.modules and "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
