"""What the Hugging Face and lm-eval tests share: a small MM-Rec saved as a checkpoint folder, offline."""

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.data.tokenizers import ByteTokenizer

# Two layers, a window of 8 and a ring of 4 slots of 4-token blocks: prompts of ~20 tokens use every memory level.
CONFIG = MMRecConfig(vocab_size=256, hidden_dim=16, num_layers=2, num_heads=2, ffn_dim=24, num_memories=2, mem_dim=4,
                     memory_size_M=4, chunk_size=4)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def saved(tmp_path):
    """A random MM-Rec with its byte tokenizer, as a checkpoint folder holds them: (model, folder)."""
    torch.manual_seed(1)
    model = MMRecModel(CONFIG).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ByteTokenizer().save(folder)
    return model, folder
