"""The exact core recurrence h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}.

    reference.py        torch backend (`MMRecRecurrence`, hand-written backward) and float64 loop
    triton_kernels.py   fused Triton kernels and the `mm_rec::recurrence_fwd` / `_bwd` operators
                        (imported on demand: needs Triton)

Public entry point, with argument checks and backend choice: `mm_rec.core.recurrence`.
Tests: tests/ops/recurrence/.
"""

from mm_rec.ops.recurrence.reference import MMRecRecurrence, recurrence_sequential

__all__ = ["MMRecRecurrence", "recurrence_sequential"]
