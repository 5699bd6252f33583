"""The whole model on a CUDA GPU: Triton backends agree with the torch references (GPU only)."""

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel

pytestmark = pytest.mark.gpu


def build(backend: str) -> MMRecModel:
    torch.manual_seed(0)
    cfg = MMRecConfig.from_preset("tiny", hidden_dim=256, num_heads=4, num_layers=2, decay_rank=16)
    model = MMRecModel(cfg).cuda()
    model.set_recurrence_backend(backend)
    return model


def test_triton_model_matches_torch_model_forward_and_backward():
    ref, fast = build("torch"), build("auto")
    ids = torch.randint(0, 256, (3, 301), device="cuda")
    out_ref, out_fast = ref(ids, labels=ids), fast(ids, labels=ids)
    rel = (out_fast.logits - out_ref.logits).norm() / out_ref.logits.norm()
    assert rel < 1e-4
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12) < 1e-3, name


def test_bf16_autocast_training_steps_stay_finite():
    model = build("auto")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (4, 512), device="cuda")
    state = None
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, state=state, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        state = out.state.detach()
        assert torch.isfinite(out.loss)
