"""lm-evaluation-harness integration (optional extra `eval`): the `mmrec` model.

    python -m mm_rec.integrations.lm_eval --model mmrec --model_args pretrained=runs/x --device cuda \
        --tasks lambada_openai

takes the arguments of lm-eval's own `lm_eval` command (it is that command, with MM-Rec
registered first: lm-eval 0.4 has no plugin discovery, so its own script cannot see the model).
In Python, `import mm_rec` registers it as soon as lm_eval is imported:

    import mm_rec, lm_eval
    lm_eval.simple_evaluate(model="mmrec", model_args="pretrained=runs/x", tasks=[...])

`pretrained` is any folder `mm_rec.loading` reads (save_pretrained, checkpoint or run folder:
its newest checkpoint); the tokenizer is the one saved beside the model. Other arguments:
`device` (lm-eval's --device; built in Python, default cuda when available, else cpu),
`segment_len` (tokens per forward, default 2048: a context of any length runs segment by segment
with the state carried, so nothing is truncated and memory does not grow with it) and lm-eval's
`batch_size` (accepted; requests run one at a time).

The model has no beginning-of-text token, so the first token of a text is predicted after the
encoding of a newline: an empty context, and the start of each `loglikelihood_rolling` text
(the convention of `mmrec generate` for an empty prompt).
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own models first: it fills only an empty registry with them
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mm_rec.loading import load_model_and_tokenizer
from mm_rec.model import MMRecModel
from mm_rec.utils.device import resolve_device

PREFIX_TEXT = "\n"  # what the first token of a text is predicted from


@register_model("mmrec")
class MMRecLM(LM):
    """An MM-Rec checkpoint as an lm-eval model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, pretrained: str, device: str = "auto", segment_len: int = 2048, batch_size=1, **kwargs):
        super().__init__()
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("max_batch_size",))
        if unknown:
            raise ValueError(f"the mmrec model does not take {unknown}; it takes pretrained, device, segment_len")
        if int(segment_len) < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        self._device = resolve_device(device)
        model, self.tokenizer, self.folder = load_model_and_tokenizer(Path(pretrained), self._device)
        if not isinstance(model, MMRecModel):
            raise ValueError(f"{pretrained} holds a {type(model).__name__}, not an MM-Rec model")
        self.model = model.eval()
        self.segment_len = int(segment_len)
        self.prefix = self.encode(PREFIX_TEXT)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.fingerprint()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.encode("utf-8"))

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of `continuation` after `context` (non-empty), and whether greedy decoding
        would have produced it. Runs `segment_len` tokens at a time with the state carried;
        segments that hold no scored position only advance the state."""
        if not context:
            raise ValueError("score needs a non-empty context")
        tokens = context + continuation
        inputs = torch.tensor([tokens[:-1]], device=self.device)
        targets = torch.tensor(tokens[1:], device=self.device)
        first = len(context) - 1  # the input position whose logits predict continuation[0]
        state, total, greedy = None, 0.0, True
        for start in range(0, inputs.shape[1], self.segment_len):
            ids = inputs[:, start:start + self.segment_len]
            end = start + ids.shape[1]
            if end <= first:
                state = self.model(ids, state=state, return_logits=False).state
                continue
            out = self.model(ids, state=state)
            state = out.state
            skip = max(first - start, 0)
            logprobs = out.logits[0, skip:].float().log_softmax(-1)
            wanted = targets[start + skip:end]
            total += float(logprobs.gather(-1, wanted[:, None]).sum())
            greedy = greedy and bool((logprobs.argmax(-1) == wanted).all())
        return total, greedy

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the context and of the continuation, cut from the encoding of both together
        (BPE merges across the boundary as it would in running text); trailing spaces of the context
        move to the continuation, as lm-eval's own models do."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return list(self.prefix), self.encode(continuation)
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args[:2]
            result = self.score(*self._split(context, continuation))
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: one pass, its state carried, no windows needed."""
        results = []
        for request in requests:
            (text,) = request.args[:1]
            tokens = self.encode(text)
            result = self.score(list(self.prefix), tokens)[0] if tokens else 0.0
            results.append(result)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Sample (greedy unless do_sample) up to max_gen_toks tokens with the model's own
        generate_stream, stopping at the first of the `until` strings (cut off)."""
        results = []
        for request in requests:
            context, gen_kwargs = request.args[0], dict(request.args[1] if len(request.args) > 1 else {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            top_k, top_p = gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None)
            if not do_sample:
                temperature = 0.0
            ids = self.encode(context) or list(self.prefix)
            decoder, text = self.tokenizer.stream_decoder(), ""
            with torch.inference_mode():
                stream = self.model.generate_stream(torch.tensor([ids], device=self.device), max_new, temperature,
                                                    top_k, top_p)
                for token in stream:
                    text += decoder.push(int(token[0]))
                    if any(stop in text for stop in until):
                        break
                else:
                    text += decoder.flush()
            cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
            results.append(text[:cut])
            self.cache_hook.add_partial("generate_until", (context, request.args[1:]), text[:cut])
        return results

