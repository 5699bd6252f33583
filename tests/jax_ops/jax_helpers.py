"""What the JAX tests share (imported after `pytest.importorskip("jax")`)."""

import jax
import numpy as np


def enable_x64():
    """Context manager turning jax's float64 on (jax.enable_x64 from jax 0.5, jax.experimental's before)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as experimental_enable_x64

    return experimental_enable_x64()


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; x a JAX array of any float dtype, ref a torch tensor."""
    x = np.asarray(x).astype(np.float64)
    ref = ref.detach().double().numpy()
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
