"""Utilities.

    mm_rec.utils.debugging   NaN/Inf detection hooks naming the first bad module, gradient-flow reports
    mm_rec.utils.profiling   wall time, FLOPs, MFU and peak memory of training steps
"""
