"""mm_rec.utils.debugging: NaN/Inf origin hooks and the gradient-flow report."""

import torch
from torch import nn

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.utils.debugging import (
    NonFiniteDetector,
    component_name,
    format_gradient_flow,
    gradient_flow,
    nonfinite_gradients,
)


class Poison(nn.Module):
    def forward(self, x):
        return x.masked_fill(x > 0, float("inf"))


class SqrtOfZero(nn.Module):
    """Finite forward (sqrt(0) = 0), non-finite backward (d sqrt / dx at 0 = inf)."""

    def forward(self, x):
        return torch.sqrt(x * 0)


def test_forward_origin_is_the_innermost_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Identity(), Poison()), nn.Linear(4, 2))
    with NonFiniteDetector(model) as detector:
        model(torch.ones(3, 4))
    assert detector.report() == "forward: first non-finite output in 1.1 (Poison)"
    detector.reset()
    assert not detector.found
    model(torch.ones(3, 4))
    assert not detector.found and not detector.handles  # detached on exit


def test_backward_origin():
    model = nn.Sequential(nn.Linear(4, 4), SqrtOfZero(), nn.Linear(4, 2))
    with NonFiniteDetector(model) as detector:
        model(torch.randn(3, 4)).sum().backward()
    assert detector.forward_origin is None
    assert detector.report() == "backward: first non-finite gradient from 1 (SqrtOfZero)"
    assert nonfinite_gradients(model) == ["0.weight", "0.bias"]


def test_gradient_flow_report_flags_what_got_no_gradient():
    cfg = MMRecConfig.from_preset("tiny", num_layers=2, hidden_dim=32, num_heads=2, ffn_dim=64, mem_dim=8,
                                  memory_size_M=4, chunk_size=8)
    model = MMRecModel(cfg)
    model.blocks[1].ffn.down.weight.requires_grad_(False)
    ids = torch.randint(0, 256, (2, 40))
    model(ids, labels=ids).loss.backward()
    stats = gradient_flow(model)
    assert {s.component for s in stats} >= {"embed", "mixer.in_proj", "mixer.W_g", "mixer.hds", "ffn", "final_norm"}
    report = format_gradient_flow(stats, "gradient flow at step 1")
    assert report.startswith("gradient flow at step 1: global grad norm")
    assert "! blocks.1.ffn.down.weight: no gradient" in report
    assert "mixer.in_proj" in report and "non-finite" not in report


def test_component_names():
    assert component_name("blocks.3.mixer.in_proj.weight") == (3, "mixer.in_proj")
    assert component_name("blocks.0.mixer.W_g") == (0, "mixer.W_g")
    assert component_name("blocks.12.ffn.gate_up.weight") == (12, "ffn")
    assert component_name("blocks.1._checkpoint_wrapped_module.mixer.hds.qkv.weight") == (1, "mixer.hds")
    assert component_name("embed.weight") == (None, "embed")
