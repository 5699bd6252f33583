"""MM-Rec: Multi-Memory Recurrence language models.

    from mm_rec import MMRecConfig, MMRecModel, MemoryState
    model = MMRecModel(MMRecConfig.from_preset("tiny"))
    out = model(input_ids)            # out.logits, out.loss, out.state
"""

from mm_rec.blocks.attention import HDSAttention, MultiMemoryAttention
from mm_rec.blocks.mm_rec_block import MMRecBlock
from mm_rec.config import MMRecConfig
from mm_rec.core.associative_scan import AssociativeScanExponential, associative_scan_exponential
from mm_rec.core.hds import HDSHierarchy
from mm_rec.core.mdi import LearnableDecay, MemoryIntegration
from mm_rec.core.memory_state import MemoryBank, MemoryState
from mm_rec.core.recurrence import mmrec_recurrence
from mm_rec.model import MMRecModel, MMRecOutput

__version__ = "0.1.0"

__all__ = [
    "AssociativeScanExponential", "HDSAttention", "HDSHierarchy", "LearnableDecay", "MMRecBlock",
    "MMRecConfig", "MMRecModel", "MMRecOutput", "MemoryBank", "MemoryIntegration", "MemoryState",
    "MultiMemoryAttention", "associative_scan_exponential", "mmrec_recurrence",
]
