"""MM-Rec: Multi-Memory Recurrence language models.

    from mm_rec import MMRecConfig, MMRecModel, MemoryState
    model = MMRecModel(MMRecConfig.from_preset("tiny"))
    out = model(input_ids)            # out.logits, out.loss, out.state

Layers, lowest first: a module imports only from its own layer and those below it, and the
command line sits on top. An import inside a function is there for import time alone
(mm_rec.distributed, Triton's mm_rec.ops), never to get round a loop. tests/test_layering.py
checks all three.

    constants, config          what every layer agrees on (IGNORE_INDEX, PARALLEL_MODES, MMRecConfig)
    ops < core < blocks < model  kernels, recurrence and memory, blocks, MMRecModel and its decoding loop
                               (mm_rec.decoding), and this package root
    baselines                  the Transformer of the same sizes
    data, utils, distributed   tokens and batches; device, atomic folders, debugging; FSDP/DDP, DCP
    loading, generation        build_model / load_model for every caller; text from a prompt
    training                   recipes, the loop, optimizer and schedule, checkpoints
    evaluation                 recall tasks and their scoring, memory inspection, the task trainer
    integrations               transformers and lm-evaluation-harness (optional extras hf, eval)
    cli                        `mmrec`: one module per command

Importing the package installs `mm_rec.integrations.hook`, which registers MM-Rec with
transformers (AutoConfig, AutoModelForCausalLM) and lm_eval when they are imported: the one
import from a higher layer, deferred until that library is in use (tests/test_layering.py).
"""

from mm_rec.blocks.attention import HDSAttention, MultiMemoryAttention
from mm_rec.blocks.mm_rec_block import MMRecBlock
from mm_rec.config import MMRecConfig
from mm_rec.core.associative_scan import AssociativeScanExponential, associative_scan_exponential
from mm_rec.core.decode_state import DecodeState
from mm_rec.core.hds import HDSHierarchy
from mm_rec.core.mdi import LearnableDecay, MemoryIntegration
from mm_rec.core.memory_state import MemoryBank, MemoryState
from mm_rec.core.recurrence import mmrec_recurrence
from mm_rec.integrations.hook import install as _install_integrations
from mm_rec.model import MMRecModel, MMRecOutput

__version__ = "0.1.0"

__all__ = [
    "AssociativeScanExponential", "DecodeState", "HDSAttention", "HDSHierarchy", "LearnableDecay", "MMRecBlock",
    "MMRecConfig", "MMRecModel", "MMRecOutput", "MemoryBank", "MemoryIntegration", "MemoryState",
    "MultiMemoryAttention", "associative_scan_exponential", "mmrec_recurrence",
]

_install_integrations()  # costs nothing until transformers or lm_eval is imported
