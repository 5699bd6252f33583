"""Hugging Face transformers integration (optional extra `hf`): MM-Rec as a transformers causal LM.

    import mm_rec                                   # registers "mmrec" once transformers is imported
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("runs/x/checkpoints/step_00000700")   # or a save_pretrained folder
    tokenizer = AutoTokenizer.from_pretrained("runs/x/checkpoints/step_00000700")
    batch = tokenizer(["ROMEO:", "To be"], return_tensors="pt", padding=True)       # left padding
    out = model.generate(**batch, max_new_tokens=50, do_sample=True, temperature=0.8, top_k=40)

* `MMRecHFConfig` (model_type "mmrec") holds the MMRecConfig fields at its top level, as the
  folder's config.json does.
* `MMRecForCausalLM` wraps an `MMRecModel` (`.model`). Its `from_pretrained` reads what
  `mm_rec.loading.load_model` reads (a save_pretrained folder, a checkpoint, sharded or not, or a
  run folder: its newest checkpoint; AutoModelForCausalLM needs a folder with a config.json, so
  give it the checkpoint, e.g. `mm_rec.loading.find_model_dir(run)`); its `save_pretrained`
  writes the MM-Rec folder, which every mm_rec loader reads.
* The cache is the recurrent state (`MMRecCache`, holding the MemoryState): `generate` feeds only
  the new token at each step, in constant memory. Greedy and sampling decoding are supported
  (beam search is not).
* `attention_mask` may pad on the left only; each row then runs from its first real token, so
  padding never enters the state and a batched row equals that row alone.
* `labels` follow transformers' convention (unshifted: the loss compares logits[:, t] with labels[:, t + 1]).

Registration happens when this module is imported; `mm_rec.integrations.hook` imports it when
transformers is imported. Written against transformers 5.x (the cache argument is `cache`) and
4.x (`past_key_values`): both names are accepted and returned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from mm_rec.config import FIXED_KEYS, RENAMED_KEYS, MMRecConfig
from mm_rec.constants import IGNORE_INDEX
from mm_rec.core.memory_state import MemoryState
from mm_rec.integrations.common import forward_left_padded
from mm_rec.loading import load_model
from mm_rec.model import MMRecModel

MODEL_TYPE = "mmrec"
_MMREC_KEYS = frozenset(f.name for f in dataclasses.fields(MMRecConfig)) | set(RENAMED_KEYS) | set(FIXED_KEYS)
# from_pretrained arguments about downloading, which a local folder does not need
_HUB_ARGUMENTS = frozenset({"cache_dir", "force_download", "local_files_only", "proxies", "revision", "token",
                            "_from_auto", "trust_remote_code", "adapter_kwargs", "code_revision", "_commit_hash",
                            "use_safetensors", "low_cpu_mem_usage", "resume_download", "use_auth_token"})


class MMRecHFConfig(PretrainedConfig):
    """An MMRecConfig as a transformers config: every MMRecConfig field is an attribute (validated
    by MMRecConfig), beside transformers' own generation fields. `hidden_size`,
    `num_hidden_layers`, `num_attention_heads` and `intermediate_size` are aliases."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "hidden_dim", "num_hidden_layers": "num_layers",
                     "num_attention_heads": "num_heads", "intermediate_size": "ffn_dim"}

    def __init__(self, **kwargs: Any):
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in _MMREC_KEYS}
        mmrec = MMRecConfig.from_dict(values)  # validates; sizes left as None are resolved
        kwargs.setdefault("tie_word_embeddings", mmrec.tie_embeddings)
        super().__init__(**kwargs)
        for key, value in mmrec.to_dict().items():  # after transformers' own fields, so none overrides them
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """A config.json's contents: one without config_version predates versions (version 1), as
        `MMRecConfig.from_saved` reads it."""
        if any(k in _MMREC_KEYS for k in config_dict) and "config_version" not in config_dict:
            config_dict = {**config_dict, "config_version": 1}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_mmrec_config(cls, config: MMRecConfig, **kwargs: Any) -> MMRecHFConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_mmrec_config(self) -> MMRecConfig:
        return MMRecConfig.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(MMRecConfig)})


class MMRecCache:
    """The recurrent state as transformers' generation cache: the MemoryState after the
    `seen_tokens` columns consumed so far (left padding included). Updated in place by each
    forward, like transformers' own caches. Its size does not grow with the sequence."""

    is_compileable = False  # read by generate: no static-cache compilation
    is_croppable = False  # the state cannot be rolled back a token

    def __init__(self, state: MemoryState, seen_tokens: int):
        self.state, self.seen_tokens = state, seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update(self, state: MemoryState, new_tokens: int) -> None:
        self.state, self.seen_tokens = state, self.seen_tokens + new_tokens

    def __repr__(self) -> str:
        return f"MMRecCache(seen_tokens={self.seen_tokens}, state={self.state!r})"


@dataclass
class MMRecCausalLMOutput(ModelOutput):
    """Logits [B, T, V], the loss when labels are given, and the cache under both of its names."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: MMRecCache | None = None
    past_key_values: MMRecCache | None = None


def _as_mmrec_cache(cache) -> MMRecCache | None:
    """Our cache, or None for no cache or an empty transformers Cache (a fresh stream)."""
    if cache is None or isinstance(cache, MMRecCache):
        return cache
    if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
        return None
    raise ValueError(f"MM-Rec carries its recurrent state in an MMRecCache, not a {type(cache).__name__}")


class MMRecForCausalLM(PreTrainedModel, GenerationMixin):
    """MMRecModel as a transformers PreTrainedModel with generate (module docstring)."""

    config_class = MMRecHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MMRecBlock"]

    def __init__(self, config: MMRecHFConfig, model: MMRecModel | None = None):
        super().__init__(config)
        if model is not None and model.config != config.to_mmrec_config():
            raise ValueError("the model's MMRecConfig differs from the config's MM-Rec fields")
        self.model = model if model is not None else MMRecModel(config.to_mmrec_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """Nothing: MMRecModel initialises its own parameters when built (MMRecModel.reset_parameters),
        and post_init must not overwrite them (nor loaded weights)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not create a key/value cache: the state comes from the first forward

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: MMRecHFConfig | None = None,
                        dtype=None, torch_dtype=None, device_map=None, subfolder: str = "", **kwargs):
        """The model in a local folder that `mm_rec.loading.load_model` reads (module docstring), in
        eval mode. `dtype` (or `torch_dtype`) and a single-device `device_map` ("cpu", "cuda:0",
        "auto") are honoured; Hub downloads, quantization and multi-device maps are not supported."""
        unsupported = sorted(k for k, v in kwargs.items() if k not in _HUB_ARGUMENTS and v is not None)
        if model_args or unsupported:
            raise ValueError(f"MMRecForCausalLM.from_pretrained does not support {unsupported or model_args}")
        path = Path(pretrained_model_name_or_path) / subfolder
        if not path.exists():
            raise OSError(f"{path} not found: MM-Rec loads local folders (save_pretrained, checkpoint or run folders)")
        model = load_model(path)
        if not isinstance(model, MMRecModel):
            raise ValueError(f"{path} holds a {type(model).__name__}, not an MM-Rec model")
        if config is None:
            config = MMRecHFConfig.from_mmrec_config(model.config)
        elif config.to_mmrec_config() != model.config:
            raise ValueError(f"the config given differs from the one saved in {path}: MM-Rec loads the saved config")
        config.name_or_path = str(pretrained_model_name_or_path)
        wrapper = cls(config, model=model)
        dtype = dtype if dtype is not None else torch_dtype
        if dtype not in (None, "auto"):
            wrapper.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device_map is not None:
            if isinstance(device_map, dict):
                raise ValueError("MM-Rec runs on one device: give device_map a device, not a map")
            if device_map == "auto":
                device_map = "cuda" if torch.cuda.is_available() else "cpu"
            wrapper.to(device_map)
        return wrapper.eval()

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False,
                        **kwargs) -> None:
        """Write the MM-Rec folder (config.json with model_type "mmrec", model.safetensors), which
        `MMRecModel.from_pretrained`, `mm_rec.loading` and AutoModelForCausalLM all read.
        Uploading and transformers' sharding options are not supported."""
        if push_to_hub:
            raise ValueError("MMRecForCausalLM.save_pretrained does not upload; save, then upload the folder")
        if is_main_process:
            self.model.save_pretrained(save_directory)

    # ------------------------------------------------------------------ forward and generation
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: MMRecCache | None = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, past_key_values: MMRecCache | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                **kwargs) -> MMRecCausalLMOutput | tuple:
        """input_ids [B, T]: the tokens after those in `cache` (None: a fresh stream, where
        `attention_mask` may pad rows on the left; its last T columns describe input_ids).
        Returns the logits, the loss for `labels` (unshifted) and, with use_cache (default), the
        cache updated in place (a new one when none was given)."""
        if output_attentions or output_hidden_states:
            raise ValueError("MM-Rec has no attention maps or per-layer hidden states to return")
        unexpected = sorted(k for k, v in kwargs.items() if v is not None and k not in ("position_ids",
                                                                                         "cache_position"))
        if unexpected:  # position_ids and cache_position: the state knows every row's position
            raise ValueError(f"MMRecForCausalLM.forward does not take {unexpected}")
        cache = _as_mmrec_cache(cache if cache is not None else past_key_values)
        T = input_ids.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        if cache is None:
            out = forward_left_padded(self.model, input_ids, mask)
        else:
            if mask is not None and not bool(mask.bool().all()):
                raise ValueError("attention_mask: padding can only precede a stream's first token (left padding)")
            out = self.model(input_ids, state=cache.state)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        if use_cache is False:
            cache = None
        elif cache is None:
            cache = MMRecCache(out.state, T)
        else:
            cache.update(out.state, T)
        result = MMRecCausalLMOutput(loss=loss, logits=out.logits, cache=cache, past_key_values=cache)
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: MMRecCache | None = None,
                                      past_key_values: MMRecCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict[str, Any]:
        """Only the tokens the state has not consumed yet (with a cache: the newest one)."""
        cache = _as_mmrec_cache(cache if cache is not None else past_key_values)
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens:]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}


def register() -> None:
    """Make AutoConfig and AutoModelForCausalLM know model_type "mmrec" (idempotent). Tokenizers
    need no registration: MM-Rec checkpoints name their class in tokenizer_config.json."""
    AutoConfig.register(MODEL_TYPE, MMRecHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(MMRecHFConfig, MMRecForCausalLM, exist_ok=True)


register()
