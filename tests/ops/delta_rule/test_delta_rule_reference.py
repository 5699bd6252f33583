"""The gated delta rule: the chunked PyTorch form against the float64 loop (and fla's naive
recurrence where fla-core is installed), at awkward sizes and both decay clamps."""

import importlib.util
from pathlib import Path

import pytest
import torch
from delta_helpers import inputs

from mm_rec.ops.delta_rule import gated_delta_rule
from mm_rec.ops.delta_rule.reference import delta_rule_chunked, delta_rule_sequential, delta_rule_step


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 67, 300])
@pytest.mark.parametrize("mk,mv", [(1, 1), (5, 4), (33, 17), (67, 9)])
def test_chunked_equals_the_float64_loop(T, mk, mv):
    args = inputs(T=T, mk=mk, mv=mv)
    o_ref, s_ref = gated_delta_rule(*args, backend="sequential")
    o, s = gated_delta_rule(*args)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-12)


def test_chunk_length_does_not_change_the_result():
    q, k, v, la, b, S0 = inputs(B=3, T=300, K=1)  # rows [N, T, m] for delta_rule_chunked: drop the bank axis
    q, k, v, la, b, S0 = q[:, :, 0], k[:, :, 0], v[:, :, 0], la[:, :, 0], b[:, :, 0], S0[:, 0]
    results = [delta_rule_chunked(q, k, v, la, b, S0, chunk_len) for chunk_len in (1, 7, 64, 256)]
    for o, s in results[1:]:
        torch.testing.assert_close(o, results[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s, results[0][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cut", [1, 30, 64, 66])
def test_state_carries_across_any_split(cut):
    args = inputs(T=131)
    o_full, s_full = gated_delta_rule(*args)
    first = [x[:, :cut] for x in args[:5]]
    second = [x[:, cut:] for x in args[:5]]
    o1, s1 = gated_delta_rule(*first, args[5])
    o2, s2 = gated_delta_rule(*second, s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-12)


def test_gradients_match_the_loop_and_gradcheck():
    args = [x.requires_grad_() for x in inputs(T=70, extreme=False)]
    o, s = gated_delta_rule(*args)
    (o.sin().sum() + s.cos().sum()).backward()
    fast = [x.grad.clone() for x in args]
    for x in args:
        x.grad = None
    o, s = gated_delta_rule(*args, backend="sequential")
    (o.sin().sum() + s.cos().sum()).backward()
    for a, x in zip(fast, args):
        torch.testing.assert_close(a, x.grad, rtol=1e-8, atol=1e-10)
    small = [x.detach()[:1, :9, :2, :3].clone().requires_grad_() if x.dim() == 4 else
             x.detach()[:1, :9, :2].clone().requires_grad_() for x in inputs(T=9, mk=3, mv=3, extreme=False)[:5]]
    S0 = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: gated_delta_rule(*a), (*small, S0))


def _rows(args):
    """[B, T, K, ...] inputs -> the [N, T, ...] rows of delta_rule_chunked (bank axis dropped), as leaves."""
    q, k, v, la, b, S0 = args
    return [x[:, :, 0].detach().clone().requires_grad_() for x in (q, k, v, la, b)] + [
        S0[:, 0].detach().clone().requires_grad_()]


def _grads(fn, rows, weights):
    o, s = fn(*rows)
    loss = 0.0
    if weights[0] is not None:
        loss = loss + (o.sin() * weights[0]).sum()
    if weights[1] is not None:
        loss = loss + (s.cos() * weights[1]).sum()
    return torch.autograd.grad(loss, rows, allow_unused=True, materialize_grads=True)  # q does not reach S


@pytest.mark.parametrize("T,chunk_len", [(1, None), (2, 1), (9, 4), (33, 8), (64, 16), (67, 64), (131, 64)])
@pytest.mark.parametrize("mk,mv", [(1, 1), (6, 3), (37, 5)])
def test_hand_written_backward_matches_autograd_of_the_loop(T, chunk_len, mk, mv):
    """The chunked form's hand-derived backward against autograd of the float64 loop: odd lengths, lengths
    that are not a multiple of the chunk, both decay clamps (alpha = 1 and e^-50), beta = 0 and 1; key
    dimensions below and above twice the chunk (the state map formed, and applied in factors)."""
    rows = _rows(inputs(B=3, T=T, K=1, mk=mk, mv=mv))
    weights = (torch.randn(3, T, mv, dtype=torch.float64), torch.randn(3, mv, mk, dtype=torch.float64))
    want = _grads(delta_rule_sequential, rows, weights)
    got = _grads(lambda *a: delta_rule_chunked(*a, chunk_len=chunk_len), rows, weights)
    for name, a, b in zip(("q", "k", "v", "log_alpha", "beta", "S0"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("only", ["outputs", "state"])
def test_backward_from_the_outputs_or_the_state_alone(only):
    rows = _rows(inputs(B=2, T=40, K=1, mk=4, mv=3))
    weights = (torch.randn(2, 40, 3, dtype=torch.float64), None) if only == "outputs" else (
        None, torch.randn(2, 3, 4, dtype=torch.float64))
    want = _grads(delta_rule_sequential, rows, weights)
    got = _grads(lambda *a: delta_rule_chunked(*a, chunk_len=16), rows, weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_across_chunks():
    rows = [x.detach()[:, :11].clone().requires_grad_() if x.dim() > 1 and x.shape[1] > 3 and i < 5 else x
            for i, x in enumerate(_rows(inputs(B=1, T=11, K=1, mk=3, mv=2)))]
    assert torch.autograd.gradcheck(lambda *a: delta_rule_chunked(*a, chunk_len=4), tuple(rows))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(dtype):
    q, k, v, la, b, S0 = inputs(T=100, extreme=False)
    o_ref, s_ref = gated_delta_rule(q, k, v, la, b, S0, backend="sequential")
    o, s = gated_delta_rule(q.to(dtype), k.to(dtype), v.to(dtype), la.float(), b.float(), S0.float())
    assert o.dtype == dtype and s.dtype == torch.float32
    assert (o.double() - o_ref).norm() / o_ref.norm() < 2e-2
    assert (s.double() - s_ref).norm() / s_ref.norm() < 2e-2


@pytest.mark.parametrize("T,mk", [(20, 64), (100, 64), (100, 16)])
def test_under_bf16_autocast_forward_and_backward(T, mk):
    """fp32 inputs under bf16 autocast, as training and scoring on a GPU run it (here on the CPU's
    autocast): the chunk products take bf16 operands, the state's recursion stays fp32 in both
    directions, with the state map formed (2L >= mk) and applied in factors (T = 20: L = 20 < mk / 2),
    and both directions agree with the float64 loop within bf16's precision."""
    q, k, v, la, b, S0 = inputs(B=2, T=T, K=2, mk=mk, mv=8, extreme=False)
    weights = (torch.randn(2, T, 2, 8, dtype=torch.float64), torch.randn(2, 2, 8, mk, dtype=torch.float64))
    results = []
    for dtype, autocast in ((torch.float64, False), (torch.float32, True)):
        rows = [x.to(dtype).requires_grad_() for x in (q, k, v, la, b, S0)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, s = gated_delta_rule(*rows, backend="sequential" if dtype == torch.float64 else "auto")
            loss = (o.double() * weights[0]).sum() + (s.double() * weights[1]).sum()
        assert s.dtype == dtype
        results.append((o, s, *torch.autograd.grad(loss, rows)))
    for name, got, want in zip(("o", "S", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dS0"), *results[::-1]):
        error = (got.double() - want).norm() / want.norm()
        assert error < 3e-2, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("mk,mv", [(1, 1), (5, 4), (33, 17)])
def test_one_token_steps_equal_the_loop(mk, mv):
    """delta_rule_step (decoding: S k and S q from one product, o = alpha S q + u (k . q)) token by token
    gives the float64 loop's outputs and final state, through both clamps and beta = 0 and 1."""
    q, k, v, la, b, S0 = inputs(B=2, T=23, K=3, mk=mk, mv=mv)
    o_ref, s_ref = gated_delta_rule(q, k, v, la, b, S0, backend="sequential")
    S, outputs = S0, []
    for t in range(q.shape[1]):
        o, S = delta_rule_step(q[:, t], k[:, t], v[:, t], la[:, t], b[:, t], S)
        outputs.append(o)
    torch.testing.assert_close(torch.stack(outputs, 1), o_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, s_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_with_the_factored_map_forward_and_backward(dtype):
    """Half inputs where the state map is factored (m = 80 > 2L): the correction's products and the
    backward's state-sized products take half operands (fp32 accumulation), the state's sums stay fp32;
    over 7 chunks, outputs, final state and every gradient stay within half precision of the float64
    loop (the half inputs' own rounding is most of it)."""
    T, mk, mv = 200, 80, 24
    q, k, v, la, b, S0 = inputs(B=2, T=T, K=2, mk=mk, mv=mv, extreme=False)
    la = la / 30  # decays near 1: the state carries across all the chunks
    weights = (torch.randn(2, T, 2, mv, dtype=torch.float64), torch.randn(2, 2, mv, mk, dtype=torch.float64))
    results = []
    for half in (False, True):
        rows = [x.to(dtype if half and i < 3 else (torch.float32 if half else torch.float64)).requires_grad_()
                for i, x in enumerate((q, k, v, la, b, S0))]
        o, s = gated_delta_rule(*rows, backend="auto" if half else "sequential")
        assert s.dtype == (torch.float32 if half else torch.float64)
        loss = (o.double() * weights[0]).sum() + (s.double() * weights[1]).sum()
        results.append((o, s, *torch.autograd.grad(loss, rows)))
    for name, got, want in zip(("o", "S", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dS0"), *results[::-1]):
        error = (got.double() - want).norm() / want.norm()
        assert error < 2e-2, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("mk", [16, 80], ids=["formed map", "factored map"])
def test_half_inputs_are_multiplied_as_given_not_widened_first(mk):
    """q, k, v handed to the chunked form in bf16 (as gated_delta_rule hands them) give bit for bit what
    they give widened to fp32 first: every product casts its operands to bf16 either way, and the
    element-wise math widens them as it reads them; only the fp32 copies are saved."""
    q, k, v, la, b, S0 = (x[0] for x in inputs(B=1, T=100, K=3, mk=mk, mv=12))  # the 3 banks as rows N
    q, k, v = (x.transpose(0, 1).contiguous() for x in (q, k, v))  # [N, T, m]
    la, b = (x.t().contiguous() / 10 for x in (la, b))  # [N, T]
    weights = torch.randn(3, 100, 12), torch.randn(3, 12, mk)
    results = []
    for widen in (False, True):
        halves = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
        rest = [x.float().requires_grad_() for x in (la, b, S0)]
        given = [x.float() if widen else x for x in halves]
        o, S = delta_rule_chunked(*given, *rest, chunk_len=32, matmul_dtype=torch.bfloat16)
        loss = (o * weights[0]).sum() + (S * weights[1]).sum()
        results.append((o, S, *torch.autograd.grad(loss, halves + rest)))
    for name, got, want in zip(("o", "S", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dS0"), *results):
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traced_under_compile_equals_eager(monkeypatch, dtype):
    """MMREC_TRACE_DELTA_RULE: with the map factored (m = 80 > 2L) torch.compile traces the chunked form's
    forward and backward (the pass one opaque operator in both graphs) and computes what the eager form
    computes: same ops, so the same numbers to rounding (aot_eager: the traced graphs run op by op), under
    bf16 autocast too, and over an uneven last chunk (T = 100: padded)."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    from mm_rec.ops.delta_rule import reference

    q, k, v, la, b, S0 = inputs(B=2, T=100, K=2, mk=80, mv=24, extreme=False)
    rows = [x.to(dtype if i < 3 else torch.float32) for i, x in enumerate((q, k, v, la / 10, b, S0))]
    weights = torch.randn(2, 100, 2, 24), torch.randn(2, 2, 24, 80)
    graphs = {"forward": [], "backward": []}

    def recording(gm, example_inputs):
        def compiler(kind):
            def compile_graph(graph, _):
                graphs[kind].append([str(node.target) for node in graph.graph.nodes])
                return make_boxed_func(graph)
            return compile_graph
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler("forward"),
                                     bw_compiler=compiler("backward"))

    def loss_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in rows]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            o, S = fn(*leaves)
        loss = (o.float() * weights[0]).sum() + (S * weights[1]).sum()
        return loss, torch.autograd.grad(loss, leaves)

    monkeypatch.setattr(reference, "TRACE_UNDER_COMPILE", True)
    torch._dynamo.reset()
    eager = loss_and_grads(gated_delta_rule)
    traced = loss_and_grads(torch.compile(gated_delta_rule, backend=recording))
    for kind, found in graphs.items():
        assert any("mm_rec.delta_chain.default" in graph for graph in found), f"no traced {kind} pass"
    torch.testing.assert_close(traced[0], eager[0], rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dlog_alpha", "dbeta", "dS0"), traced[1], eager[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_traced_and_compiled_by_inductor_equals_eager(monkeypatch):
    """MMREC_TRACE_DELTA_RULE under inductor (its CPU lowering: the traced graphs' element-wise work fused and
    reordered, the pass an opaque operator): the chunked form's outputs and gradients equal the eager form's to
    fp32 rounding (fp32, factored map, an uneven last chunk). The GPU's lowering is tested on the GPU."""
    from mm_rec.ops.delta_rule import reference

    q, k, v, la, b, S0 = inputs(B=2, T=100, K=2, mk=80, mv=24, extreme=False)
    rows = (q, k, v, la / 10, b, S0)
    weights = torch.randn(2, 100, 2, 24), torch.randn(2, 2, 24, 80)

    def loss_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in rows]
        o, S = fn(*leaves)
        loss = (o * weights[0]).sum() + (S * weights[1]).sum()
        return loss, torch.autograd.grad(loss, leaves)

    monkeypatch.setattr(reference, "TRACE_UNDER_COMPILE", True)
    torch._dynamo.reset()
    eager = loss_and_grads(gated_delta_rule)
    compiled = loss_and_grads(torch.compile(gated_delta_rule))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dlog_alpha", "dbeta", "dS0"), compiled[1], eager[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_shapes_are_refused():
    q, k, v, la, b, S0 = inputs()
    with pytest.raises(ValueError, match="log_alpha and beta"):
        gated_delta_rule(q, k, v, la[:, :3], b, S0)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, la, b, S0[:, :1])
    with pytest.raises(ValueError, match="backend"):
        gated_delta_rule(q, k, v, la, b, S0, backend="cuda")


def _fla_naive():
    """fla's naive recurrence, loaded from its file (fla's package __init__ imports its GPU kernels)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "ops" / "gated_delta_rule" / "naive.py"
    if not path.is_file() or importlib.util.find_spec("einops") is None:
        return None
    module_spec = importlib.util.spec_from_file_location("fla_gated_delta_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.naive_recurrent_gated_delta_rule


def test_matches_fla_naive_recurrence():
    naive = _fla_naive()
    if naive is None:
        pytest.skip("fla-core (and einops) not installed: pip install 'mm-rec[dev]'")
    q, k, v, la, b, S0 = inputs(T=45, extreme=False, dtype=torch.float32)
    o, s = gated_delta_rule(q, k, v, la, b, S0)
    # fla: state [B, H, K, V] (key x value), q scaled by `scale` inside
    o_fla, s_fla = naive(q, k, v, b, la, scale=1.0, initial_state=S0.transpose(-1, -2), output_final_state=True)
    torch.testing.assert_close(o, o_fla, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_fla.transpose(-1, -2), rtol=1e-4, atol=1e-5)
