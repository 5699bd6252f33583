"""The Llama-style Transformer baseline: MM-Rec's forward contract, causality, gradient flow."""

import pytest
import torch
import torch.nn.functional as F

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.baselines.transformer import TransformerModel, apply_rope, rope_tables


def tiny(**overrides) -> TransformerModel:
    return TransformerModel(MMRecConfig.from_preset("tiny", num_layers=2, **overrides))


def test_forward_contract_matches_mmrec():
    model = tiny()
    ids = torch.randint(0, 256, (3, 17))
    labels = torch.randint(0, 256, (3, 17))
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, 17, 256) and out.state is None
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)
    assert model(ids, labels=labels, return_logits=False).logits is None
    assert model(ids, labels=torch.full_like(ids, -100)).loss.item() == 0.0
    assert model.lm_head.weight is model.embed.weight
    assert tiny(tie_embeddings=False).lm_head.weight is not tiny(tie_embeddings=False).embed.weight


def test_bad_input_is_refused():
    model = tiny()
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="no recurrent state"):
        model(ids, state=object())
    with pytest.raises(ValueError, match="vocab_size"):
        model(ids + 256)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :4])


def test_causal():
    model = tiny().eval()
    ids = torch.randint(0, 256, (2, 24))
    changed = ids.clone()
    changed[:, 13:] = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :13], b[:, :13])
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def test_every_parameter_gets_a_gradient():
    model = tiny(tie_embeddings=False)
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=torch.roll(ids, -1, dims=1)).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_rope_is_a_rotation_that_depends_on_relative_position():
    cos, sin = rope_tables(12, 8, torch.device("cpu"))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    q_all, k_all = apply_rope(q.expand(1, 12, 1, 8), cos, sin), apply_rope(k.expand(1, 12, 1, 8), cos, sin)
    torch.testing.assert_close(q_all.norm(dim=-1), q.norm(dim=-1).expand(1, 12, 1))
    score = lambda i, j: (q_all[0, i, 0] * k_all[0, j, 0]).sum()
    torch.testing.assert_close(score(5, 2), score(9, 6))
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is unrotated


def test_config_sizes_drive_the_shapes():
    config = MMRecConfig.from_preset("tiny", num_layers=3, hidden_dim=64, num_heads=2, ffn_dim=96, vocab_size=100)
    model = TransformerModel(config)
    assert len(model.blocks) == 3
    block = model.blocks[0]
    assert block.attn.qkv.weight.shape == (3 * 64, 64) and block.ffn.down.weight.shape == (64, 96)
    per_block = 4 * 64 * 64 + 3 * 64 * 96 + 2 * 64
    assert model.num_parameters() == 100 * 64 + 3 * per_block + 64


def test_save_load_and_generate(tmp_path):
    model = tiny().eval()
    model.save_pretrained(tmp_path)
    loaded = TransformerModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    out = model.generate(ids, 4, temperature=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :6], ids)
    assert torch.equal(out[:, 6], model(ids).logits[:, -1].argmax(-1))  # greedy continues the argmax
    MMRecModel(MMRecConfig.from_preset("tiny", num_layers=1)).save_pretrained(tmp_path / "mmrec")
    with pytest.raises(ValueError, match="not a 'transformer'"):
        TransformerModel.from_pretrained(tmp_path / "mmrec")


def test_prompts_of_different_lengths_generate_as_each_alone():
    model = tiny().eval()
    lengths = [3, 7, 1]
    ids = torch.randint(0, 256, (3, 7))
    batched = model.generate(ids, 5, temperature=0, lengths=lengths)
    for b, n in enumerate(lengths):
        assert torch.equal(batched[b, 7:], model.generate(ids[b:b + 1, :n], 5, temperature=0)[0, n:])
