"""The memory's ops on a CUDA GPU against the float64 CPU references (GPU only).

The window attention, the slot attention, the retention bookkeeping and the chunked delta rule
run as PyTorch code on the GPU (compiled or not): in fp32 they must equal the float64 reference
to fp32 rounding, and in bf16 (autocast, as in training) within bf16 tolerance.
"""

import pytest
import torch
from random_models import gpu_small_model

from mm_rec import MMRecModel
from mm_rec.ops.delta_rule import gated_delta_rule

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T", [1, 67, 300])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_delta_rule_on_gpu_matches_the_float64_loop(T, dtype, tol):
    B, K, m = 2, 3, 33
    q = torch.randn(B, T, K, m, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, K, m, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, K, m, dtype=torch.float64)
    log_alpha = -torch.rand(B, T, K, dtype=torch.float64) * 2
    log_alpha[:, ::5] = -50.0  # both clamps
    log_alpha[:, 1::7] = 0.0
    beta = torch.rand(B, T, K, dtype=torch.float64)
    S0 = torch.randn(B, K, m, m, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, log_alpha, beta, S0)]
    o_ref, s_ref = gated_delta_rule(*inputs, backend="sequential")
    (o_ref.sum() + s_ref.sum()).backward()
    grads_ref = [x.grad.clone() for x in inputs]
    gpu = [x.detach().cuda().to(dtype).requires_grad_() for x in inputs[:3]] + \
          [x.detach().cuda().requires_grad_() for x in inputs[3:]]
    o, s = gated_delta_rule(*gpu)
    assert rel(o, o_ref) < tol and rel(s, s_ref) < tol
    (o.float().sum() + s.sum()).backward()
    for x, g in zip(gpu, grads_ref):  # gradients through decays at the -50 clamp are ~1e-20: absolute
        assert rel(x.grad, g) < 5 * tol or (x.grad.double().cpu() - g).abs().max() < 1e-6


def small_model(**overrides) -> MMRecModel:
    return gpu_small_model(**overrides)


@pytest.mark.parametrize("overrides", [dict(), dict(slots_per_block=2, memory_size_M=8, recent_slots=4)])
def test_model_on_gpu_matches_float64_cpu_forward_backward_and_state(overrides):
    ref = small_model(**overrides).double()
    gpu = small_model(**overrides).cuda()
    ids = torch.randint(0, 97, (3, 211))
    out_ref = ref(ids, labels=ids)
    out = gpu(ids.cuda(), labels=ids.cuda())
    assert rel(out.logits, out_ref.logits) < 1e-4
    for key, value in out_ref.state.state_dict().items():
        assert rel(out.state.state_dict()[key].cpu(), value) < 1e-4 or value.abs().max() == 0, key
    out_ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), gpu.parameters()):
        assert rel(q.grad.cpu(), p.grad) < 1e-3, name
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = gpu(ids.cuda(), labels=ids.cuda())
    assert rel(bf16.logits.float(), out_ref.logits) < 3e-2


def test_compiled_model_matches_eager_and_carries_state():
    model = small_model().cuda()
    compiled = torch.compile(model, dynamic=False)
    ids = torch.randint(0, 97, (2, 150), device="cuda")
    eager = model(ids)
    state, logits = None, []
    for part in ids.split([70, 80], dim=1):  # cuts off block edges: 70 = 8 * 8 + 6
        out = compiled(part, state=state)
        state, logits = out.state, logits + [out.logits]
    assert rel(torch.cat(logits, 1), eager.logits) < 1e-4
