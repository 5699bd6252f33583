"""The log-space associative scan h_t = exp(log_a_t) * h_{t-1} + b_t over dim 1.

    reference.py        torch backend (chunked, `AssociativeScanExponential`) and float64 loop
    triton_kernels.py   Triton kernels and the `mm_rec::scan_fwd` / `mm_rec::scan_bwd` operators
                        (imported on demand: needs Triton)

Public entry point, with argument checks and backend choice: `mm_rec.core.associative_scan`.
Tests: tests/ops/scan/.
"""

from mm_rec.ops.scan.reference import AssociativeScanExponential, scan_chunked, scan_sequential

__all__ = ["AssociativeScanExponential", "scan_chunked", "scan_sequential"]
