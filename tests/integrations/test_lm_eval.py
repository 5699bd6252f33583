"""The lm-eval `mmrec` model: its loglikelihoods are the model's own negative log-likelihoods (long
contexts segment by segment, the state carried), through its methods and through lm-eval's
evaluator on a task over a local jsonl file (tests/fixtures/lm_eval, offline)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402

from mm_rec import MMRecModel  # noqa: E402
from mm_rec.integrations.lm_eval import MMRecLM  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval"


def reference(model: MMRecModel, context: bytes, continuation: bytes) -> tuple[float, bool]:
    """log P(continuation | context) from one forward over the whole text (no segments)."""
    tokens = torch.tensor([list(context + continuation)])
    with torch.no_grad():
        logprobs = F.log_softmax(model(tokens[:, :-1]).logits[0].double(), -1)
    targets = tokens[0, 1:]
    scored = slice(len(context) - 1, None)
    picked = logprobs[scored].gather(-1, targets[scored, None])
    return float(picked.sum()), bool((logprobs[scored].argmax(-1) == targets[scored]).all())


def test_registered_as_mmrec():
    assert get_model("mmrec") is MMRecLM
    assert "hf" in model_registry  # lm-eval's own models are still registered


@pytest.mark.parametrize("segment_len", [2048, 7])
def test_loglikelihood_equals_the_models_own(saved, segment_len):
    model, folder = saved
    lm = MMRecLM(pretrained=str(folder), device="cpu", segment_len=segment_len)
    long_context = bytes(torch.randint(32, 127, (60,)).tolist()).decode()
    pairs = [("The capital of France is", " Paris"), ("def f(x):\n    return", " x + 1"),
             (long_context, " and then some more text"), ("Héllo ", "wörld")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        if context.endswith(" "):  # trailing spaces move to the continuation (lm-eval's convention)
            context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        expected, expected_greedy = reference(model, context.encode(), continuation.encode())
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy


def test_a_greedy_continuation_is_recognised_and_rolling_covers_every_token(saved):
    model, folder = saved
    lm = MMRecLM(pretrained=str(folder), device="cpu", segment_len=5)
    ids = list(b"Once upon a time")
    greedy_ids = model.generate(torch.tensor([ids]), 6, temperature=0)[0, -6:].tolist()
    assert lm.score(ids, greedy_ids)[1]
    assert not lm.score(ids, greedy_ids[:-1] + [(greedy_ids[-1] + 1) % 256])[1]

    text = "A whole document, scored from its first token.\n" * 3
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    expected, _ = reference(model, b"\n", text.encode())  # the first token is predicted after a newline
    assert rolling == pytest.approx(expected, rel=1e-5)


def test_generate_until_stops_at_the_first_stop_string(saved):
    model, folder = saved
    lm = MMRecLM(pretrained=str(folder), device="cpu")
    context = "abc"
    full = bytes(model.generate(torch.tensor([list(context.encode())]), 20, temperature=0)[0, 3:].tolist())
    text = full.decode("utf-8", errors="replace")
    stop = text[5:7]
    (unbounded, bounded) = lm.generate_until([
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 20}), 0),
        Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 20}), 1)])
    assert unbounded == text
    assert bounded == text[:text.index(stop)]


def test_the_evaluator_on_a_local_task_scores_with_the_models_loglikelihoods(saved, monkeypatch):
    """lm-eval end to end: a multiple-choice task defined over tests/fixtures/lm_eval/mmrec_tiny.jsonl."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, folder = saved
    lm = MMRecLM(pretrained=str(folder), device="cpu")
    monkeypatch.chdir(FIXTURES)  # the task's data_files path is relative
    results = simple_evaluate(model=lm, tasks=["mmrec_tiny_choice"],
                              task_manager=TaskManager(include_path=str(FIXTURES)), log_samples=True)
    samples = results["samples"]["mmrec_tiny_choice"]
    assert len(samples) == 4
    for sample in samples:
        doc = sample["doc"]
        for choice, response in zip(doc["choices"], sample["filtered_resps"]):
            expected, _ = reference(model, doc["question"].encode(), (" " + choice).encode())
            assert float(response[0]) == pytest.approx(expected, rel=1e-5)
        assert sample["acc"] == float(max(range(len(doc["choices"])),
                                          key=lambda i: float(sample["filtered_resps"][i][0])) == doc["answer"])
