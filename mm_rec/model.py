"""MMRecModel: token embeddings, a stack of MM-Rec blocks, final RMSNorm and the LM head.

    out = model(input_ids, state=None, labels=None)
    out.logits [B, T, V]; out.loss (mean cross entropy over labels != -100); out.state

`labels[b, t]` is the target for position t, i.e. the token that follows input_ids[b, t]
(already shifted), so a stream cut into segments loses no prediction at the cuts. The state
carries everything needed to continue the stream: forward over a whole sequence equals forward
over consecutive segments with the state passed along (invariant I4, docs/architecture.md), and generation feeds one
token at a time through the same state (I5).

Decoding: `prefill` reads prompts (left-aligned, per-row lengths: no padding token ever enters a
row's state) in forwards, `step` advances every row by one token in O(1) on a `DecodeState`, and
`generate_stream` runs one after the other (on CUDA, each step replays a captured CUDA graph:
mm_rec/decoding.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm_rec.blocks.layers import RMSNorm
from mm_rec.blocks.mm_rec_block import MMRecBlock
from mm_rec.config import MMRecConfig
from mm_rec.constants import IGNORE_INDEX
from mm_rec.core.decode_state import DecodeState
from mm_rec.core.memory_state import MemoryState
from mm_rec.decoding import StepRunner
from mm_rec.quantization import Quantization, is_quantized_folder, load_quantized, remove_quantized, save_quantized

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MMRecOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None
    state: MemoryState


class LanguageModel(nn.Module):
    """What MMRecModel and the Transformer baseline share: the input checks, `generate` over the
    subclass's `generate_stream`, and the save_pretrained folder (config.json, model.safetensors; for a
    model whose weights `mm_rec.quantization.quantize_model` quantized, quantization.json and model.pt).

    `model_type` is the config.json marker that tells loaders which class to build ("mmrec" or
    "transformer"); it is also the model_type transformers' AutoConfig reads. Folders written
    before MM-Rec wrote its marker have none, and read as "mmrec".
    """

    model_type: str = "mmrec"
    config: MMRecConfig
    quantization: Quantization | None = None  # set by mm_rec.quantization.quantize_model

    def _check_token_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty (T = 0)")
        V = self.config.vocab_size
        lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one device sync
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must lie in [0, {V}) (vocab_size), got values in [{lo}, {hi}]")
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, {V}) or be {IGNORE_INDEX}")

    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, state=None,
                        generator: torch.Generator | None = None, *,
                        lengths: Sequence[int] | torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token [B] of every row for each of `max_new_tokens` steps, as they come.
        input_ids [B, T]: left-aligned prompts, row b's in its first lengths[b] tokens (None: all T)."""
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, state=None,
                 generator: torch.Generator | None = None, *,
                 lengths: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Return [B, T + max_new_tokens]: the prompts as given (with `lengths`, left-aligned and padded to
        T) followed by the generated tokens."""
        new = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p, state, generator,
                                        lengths=lengths))
        return torch.cat([input_ids.long()] + [t[:, None] for t in new], dim=1)

    def _build_stack(self, config: MMRecConfig, block: type[nn.Module]) -> None:
        """The skeleton both models share: token embedding, `num_layers` blocks of `block`, the final
        RMSNorm and the LM head (tied to the embedding when config.tie_embeddings)."""
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.blocks = nn.ModuleList(block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _init_linear_embedding_norm(self, residual_writes: tuple[str, ...]) -> None:
        """N(0, init_std) for embeddings and projections; N(0, init_std / sqrt(2L)) for the
        projections whose names end with one of `residual_writes` (they add into the residual
        stream, whose variance then stays O(1) with depth); RMSNorm weights at one."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, residual_std if name.endswith(residual_writes) else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (the `model_type` marker and the config) and model.safetensors, or for a
        quantized model quantization.json and model.pt (mm_rec/quantization.py); a save replaces the
        weights an earlier one left in the folder."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_pretrained_config(self, directory)
        if self.quantization is not None:
            (directory / WEIGHTS_NAME).unlink(missing_ok=True)
            save_quantized(self, directory)
        else:
            remove_quantized(directory)
            save_model(self, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None):
        """The model in a save_pretrained folder, on `device` (default: CPU); a quantized one comes back
        quantized. Raises FileNotFoundError for a missing file and ValueError for a folder of another
        model type or unreadable contents (or quantized weights that cannot be rebuilt here)."""
        from safetensors.torch import load_model

        directory = Path(directory)
        model_type, config = read_pretrained_config(directory)
        if model_type != cls.model_type:
            raise ValueError(f"{directory} holds a {model_type!r} model, not a {cls.model_type!r} one")
        if is_quantized_folder(directory):
            return load_quantized(cls(config), directory, device)
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory / WEIGHTS_NAME} not found (expected a save_pretrained directory)")
        model = cls(config)
        try:
            load_model(model, str(directory / WEIGHTS_NAME), strict=True, device=str(device or "cpu"))
        except Exception as err:
            detail = " ".join(str(err).split())  # torch lists every mismatched tensor on a line of its own
            raise ValueError(f"could not load weights from {directory / WEIGHTS_NAME}: {detail}") from err
        return model.to(device) if device is not None else model


def write_pretrained_config(model: LanguageModel, directory: Path) -> None:
    """config.json of a save_pretrained folder: the model's `model_type` marker and its config."""
    values = {"model_type": model.model_type, **model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(values, indent=2) + "\n")


def read_pretrained_config(directory: Path) -> tuple[str, MMRecConfig]:
    """The `model_type` marker (none, in older folders: "mmrec") and the config in a save_pretrained folder's
    config.json. FileNotFoundError when it is missing, ValueError when it is not valid JSON or
    not a valid configuration."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a save_pretrained directory)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, got {type(values).__name__}")
    model_type = values.pop("model_type", "mmrec")
    return model_type, MMRecConfig.from_saved(values)  # no config_version: written before versions, v1


def check_lengths(lengths: Sequence[int] | torch.Tensor | None, input_ids: torch.Tensor) -> list[int]:
    """Per-row prompt lengths of left-aligned prompts input_ids [B, T] as a list (None: every row has T
    tokens); ValueError unless there is one per row, each in [1, T]."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    B, T = input_ids.shape
    if lengths is None:
        return [T] * B
    values = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    if len(values) != B or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= T for n in values):
        raise ValueError(f"lengths must give one prompt length in [1, {T}] per row ({B} rows), got {values}")
    return values


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   name=lambda argument: argument) -> None:
    """ValueError for generation arguments that `sample_next_token` cannot honour; `name` turns an
    argument's name into the one the caller knows (the command line's flags)."""
    if max_new_tokens < 0:
        raise ValueError(f"{name('max_new_tokens')} must be >= 0, got {max_new_tokens}")
    if not temperature >= 0 or math.isinf(temperature):  # NaN fails every comparison
        raise ValueError(f"{name('temperature')} must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{name('top_k')} must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p')} must lie in (0, 1], got {top_p}")


class MMRecModel(LanguageModel):
    def __init__(self, config: MMRecConfig):
        super().__init__()
        self._build_stack(config, MMRecBlock)
        self.gradient_checkpointing = False  # per-segment recomputation for long inputs
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Initialisation: the model's policy for its linear layers, then each module's own.

        * embeddings and projections: N(0, init_std), GPT-2 style;
        * the two projections that write into the residual stream (mixer out_proj, FFN down):
          N(0, init_std / sqrt(2 * num_layers)), so the residual variance stays O(1) with depth;
        * every other parameter is initialised by the module that owns it (`MMRecBlock.
          reset_parameters` -> `MMRecMixer.reset_parameters`: W_g, the decay, the short
          convolution, the memory's time scales, slopes and write queries).
        """
        self._init_linear_embedding_norm(residual_writes=("mixer.out_proj", "ffn.down"))
        for block in self.blocks:
            block.reset_parameters()

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device=None) -> MemoryState:
        """A fresh (all-zero) state for `batch_size` streams, fp32 (float64 for a float64 model)."""
        param = self.embed.weight
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        return MemoryState.zeros(self.config, batch_size, device=device or param.device, dtype=dtype)

    def decode_entry_dtype(self) -> torch.dtype | None:
        """The dtype a `DecodeState` holds the window's and the ring's keys and values in for this model's
        step: the weights' dtype when it is half (the forward reads the entries in it: nothing lost, half
        the bytes a step reads), else the state's own (None)."""
        dtype = self.embed.weight.dtype
        return dtype if dtype in (torch.bfloat16, torch.float16) else None

    def set_recurrence_backend(self, backend: str) -> None:
        """Force "torch", "triton" or "sequential" for every block's core recurrence."""
        for block in self.blocks:
            block.mixer.recurrence_backend = backend

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None, state: MemoryState | None) -> None:
        self._check_token_inputs(input_ids, labels)
        if state is not None:
            if state.batch_size != input_ids.shape[0] or state.num_layers != self.config.num_layers:
                raise ValueError(f"state is for batch {state.batch_size} x {state.num_layers} layers, "
                                 f"input is batch {input_ids.shape[0]} for a {self.config.num_layers}-layer model")

    def _forward_segment(self, input_ids: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        """input_ids [B, T] -> final hidden states [B, T, D] and the state after the segment."""
        x = self.embed(input_ids)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, new_layer_state = block(x, layer_state, state.position)
            layers.append(new_layer_state)
        return self.final_norm(x), MemoryState(layers, state.position + input_ids.shape[1])

    def forward(self, input_ids: torch.Tensor, state: MemoryState | None = None,
                labels: torch.Tensor | None = None, return_logits: bool = True,
                loss_reduction: str = "mean") -> MMRecOutput:
        """Run the model over input_ids [B, T] from `state` (a fresh stream when None).

        Inputs longer than `config.max_segment_len` run as consecutive segments with the state
        carried; with gradients enabled each segment is recomputed in backward
        (activation checkpointing), so activation memory does not grow with T.

        loss_reduction: "mean" (cross entropy averaged over the labelled tokens) or "sum" (summed
        over them: sequence parallelism divides by the count over all processes).
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self._check_inputs(input_ids, labels, state)
        if state is None:
            state = self.init_state(input_ids.shape[0], device=input_ids.device)
        input_ids = input_ids.long()
        T = input_ids.shape[1]
        seg_len = self.config.max_segment_len
        recompute = torch.is_grad_enabled() and (self.gradient_checkpointing or T > seg_len)
        logits_parts, loss_sum, count = [], None, 0
        for start in range(0, T, seg_len):
            ids = input_ids[:, start:start + seg_len]
            if recompute:
                hidden, state = checkpoint(self._forward_segment, ids, state, use_reentrant=False)
            else:
                hidden, state = self._forward_segment(ids, state)
            logits = self.lm_head(hidden)
            if labels is not None:
                seg_labels = labels[:, start:start + seg_len]
                flat = logits.reshape(-1, logits.shape[-1])
                flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # loss in fp32 at least
                seg_loss = F.cross_entropy(flat, seg_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
                loss_sum = seg_loss if loss_sum is None else loss_sum + seg_loss
                count = count + (seg_labels != IGNORE_INDEX).sum()  # a tensor: no device sync
            if return_logits:
                logits_parts.append(logits)
        loss = None
        if labels is not None:
            loss = loss_sum if loss_reduction == "sum" else loss_sum / count.clamp_min(1)
        logits = (logits_parts[0] if len(logits_parts) == 1 else torch.cat(logits_parts, 1)) if return_logits else None
        return MMRecOutput(logits=logits, loss=loss, state=state)

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None = None,
                state: MemoryState | None = None) -> tuple[torch.Tensor, MemoryState]:
        """Read prompts: input_ids [B, T] left-aligned, row b's prompt in its first lengths[b] tokens (None:
        all T; the tokens after it are padding and never enter the state), each row from its row of
        `state` (None: a fresh stream). Returns the logits [B, V] at each row's last prompt token and
        the state after the prompts.

        Rows of equal length share a forward: the forwards run over the spans between consecutive
        distinct lengths, each over the rows whose prompts reach into it (segment invariance, I4, makes
        this the same as reading every prompt alone). Only the last position's logits are formed."""
        lengths = check_lengths(lengths, input_ids)
        B = input_ids.shape[0]
        self._check_inputs(input_ids[:, :1], None, state)
        if state is None:
            state = self.init_state(B, device=input_ids.device)
        last, start = None, 0
        for end in sorted(set(lengths)):
            rows = [b for b, n in enumerate(lengths) if n >= end]
            index = torch.tensor(rows, device=input_ids.device)
            part = state if len(rows) == B else state.select_rows(index)
            ids = input_ids[index, start:end]
            if end - start > 1:  # all but the last token without logits, then the last one with them
                part = self(ids[:, :-1], state=part, return_logits=False).state
            out = self(ids[:, -1:], state=part)  # through __call__: module hooks (FSDP's gathers) run
            if last is None:
                last = out.logits.new_zeros(B, out.logits.shape[-1])
            ends_here = torch.tensor([lengths[b] == end for b in rows], device=input_ids.device)
            last[index[ends_here]] = out.logits[ends_here, -1]
            state = out.state if len(rows) == B else state.with_rows(index, out.state)
            start = end
        return last, state

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One token per row in O(1): input_ids [B] (the token at each row's position) -> logits [B, V] of
        the next token. `state` (a DecodeState: `DecodeState.from_memory_state(memory_state, config)`)
        advances in place by one token; the same result as `forward(input_ids[:, None], memory_state)`
        (invariant I5). Token ids are not range-checked here (that needs a host sync). The step calls
        the blocks' `step`, not their forward, so it needs unsharded parameters (not FSDP's)."""
        if not self._parameters_are_local():
            raise ValueError("step needs the model's own parameters; these are sharded (FSDP): generate "
                             "falls back to the forward per token")
        if input_ids.dim() != 1 or input_ids.shape[0] != state.batch_size or state.num_layers != len(self.blocks):
            raise ValueError(f"step takes input_ids [B] with a DecodeState of B rows and {len(self.blocks)} layers; "
                             f"got {tuple(input_ids.shape)} and {state!r}")
        return self._step(input_ids, state)

    def _step(self, input_ids: torch.Tensor, state: DecodeState, close_blocks: bool = True,
              block_step: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """`step` without checks: static shapes, no host sync, no Python branch on tensor values, every
        state tensor written in place, so it can be captured in a CUDA graph (`StepRunner`).
        `close_blocks=False` skips the writes of a block's slots into the ring, valid only when no row's
        token closes its block (`closes_a_block`): C - 1 of every C tokens need a smaller step.
        `block_step(block, x, layer_state, position, close_blocks)` replaces `MMRecBlock.step` (a
        compiled one: `StepRunner(compile=True)`)."""
        step = block_step or MMRecBlock.step
        x = self.embed(input_ids)  # [B, D]
        for block, layer_state in zip(self.blocks, state.layers):
            x = step(block, x, layer_state, state.position, close_blocks)
        state.position.add_(1)
        return self.lm_head(self.final_norm(x))

    def _parameters_are_local(self) -> bool:
        """False when the parameters are DTensors (FSDP2, tensor parallelism): only the modules' forward
        hooks gather those, and the step path calls no forward."""
        if not torch.distributed.is_available():
            return True
        from torch.distributed.tensor import DTensor  # slow to import: asked once per generation

        return not any(isinstance(p, DTensor) for p in self.parameters())

    @torch.inference_mode()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, state: MemoryState | None = None,
                        generator: torch.Generator | None = None, *,
                        lengths: Sequence[int] | torch.Tensor | None = None, use_step: bool | None = None,
                        cuda_graph: bool | None = None, compile_step: bool = False) -> Iterator[torch.Tensor]:
        """Yield the next token [B] of every row for each of `max_new_tokens` steps, as they come.

        The prompts (input_ids [B, T], left-aligned, `lengths` per row; see `prefill`) run in forwards
        from `state`; then every row advances one token per `step` in O(1) memory and time per token.
        On CUDA each step replays a captured CUDA graph (`StepRunner`; `cuda_graph=False`: eager;
        `compile_step`: torch.compile the step before capturing it). `use_step=False` (the default
        where the parameters are sharded, FSDP) feeds each token through `forward` instead: the same
        tokens, the whole segment machinery per token. temperature == 0 means greedy. A caller stops
        early by leaving the loop (stop tokens, stop strings: mm_rec/generation.py)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        logits, memory = self.prefill(input_ids, lengths, state)
        next_logits = None  # token [B] -> logits [B, V], made after the first token (none if only one)
        for i in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            yield token
            if i + 1 < max_new_tokens:
                if next_logits is None:
                    next_logits = self._next_logits_function(memory, use_step, cuda_graph, compile_step)
                logits = next_logits(token)

    def _next_logits_function(self, memory: MemoryState, use_step: bool | None, cuda_graph: bool | None,
                              compile_step: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """Generation's per-token function from the state after the prompt: `StepRunner.step`, or a
        forward over T = 1 with the state carried."""
        if use_step is None:
            use_step = self._parameters_are_local()
        if use_step:
            decode = DecodeState.from_memory_state(memory, self.config, self.decode_entry_dtype())
            return StepRunner(self, decode, cuda_graph, compile=compile_step).step
        state = memory

        def forward_one(token: torch.Tensor) -> torch.Tensor:
            nonlocal state
            out = self(token[:, None], state=state)
            state = out.state
            return out.logits[:, -1]

        return forward_one


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]; greedy when temperature == 0 or top_k == 1."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
