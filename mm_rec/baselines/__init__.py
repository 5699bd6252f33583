"""Reference models trained and benchmarked beside MM-Rec with the same sizes and contracts."""

from mm_rec.baselines.transformer import TransformerConfig, TransformerModel, TransformerOutput

__all__ = ["TransformerConfig", "TransformerModel", "TransformerOutput"]
