"""scripts/token_loss_by_context.py: distances to a target's previous occurrence against a brute-force
search, and per-token losses with the state carried across windows against one forward pass."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.random_models import gpu_small_model

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("token_loss_by_context", ROOT / "scripts" / "token_loss_by_context.py")
script = importlib.util.module_from_spec(spec)
sys.modules["token_loss_by_context"] = script
spec.loader.exec_module(script)


@pytest.mark.parametrize("window", [1, 7, 13])
def test_previous_occurrence_matches_brute_force(window):
    rng = random.Random(window)
    ids = torch.tensor([rng.randrange(5) for _ in range(script.STREAMS * 3 * window + 1)])
    rows = script.streams_of(ids, window)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    distance = script.previous_occurrence(inputs, targets, window)
    for row in range(inputs.shape[0]):
        for t in range(inputs.shape[1]):
            start = t - t % window
            back = [t + 1 - s for s in range(start, t + 1) if inputs[row, s] == targets[row, t]]
            expected = min(back) if back else script.NEVER
            assert distance[row, t] == expected, (row, t)


def test_carried_windows_equal_one_forward():
    model = gpu_small_model().double().eval()
    window = 11  # off the model's 8-token blocks
    ids = torch.randint(0, model.config.vocab_size, (script.STREAMS * 3 * window + 1,))
    rows = script.streams_of(ids, window)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    losses = script.token_losses(model, rows, window)
    with torch.no_grad():
        whole = model(inputs).logits
    expected = F.cross_entropy(whole.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-9)


def test_too_little_data_is_refused():
    with pytest.raises(ValueError, match="fewer than"):
        script.streams_of(torch.arange(100), 256)
