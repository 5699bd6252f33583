"""What the integrations share: running a left-padded batch so that padding never enters the state."""

from __future__ import annotations

import torch

from mm_rec.model import MMRecModel, MMRecOutput


def check_left_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The index of each row's first real token, for a [B, T] mask of 1 (token) and 0 (padding)
    whose zeros all come before the ones (left padding). ValueError for any other mask."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: every row must end with a real token (pad on the left; an all-padding "
                         "row has nothing to continue)")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask: MM-Rec reads padding only on the left (zeros before the first 1 of a row); "
                         "use padding_side='left'")
    return (~mask).sum(dim=1)


def forward_left_padded(model: MMRecModel, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> MMRecOutput:
    """`model(input_ids)` from a fresh state, with every row starting at its first real token.

    A recurrent state would absorb padding, so the batch runs as consecutive segments cut at the
    rows' first real tokens, and each row's state is reset (`MemoryState.reset`: position 0, all
    zeros) where its real tokens begin: each row ends exactly as it would alone (up to the float
    rounding of a different segmentation). Logits at padded positions are meaningless.
    """
    if attention_mask is None or bool(attention_mask.bool().all()):
        return model(input_ids)
    starts = check_left_padding(attention_mask, input_ids).to(input_ids.device)
    # the padding's ids are never read (those rows are reset), so any pad id will do, even one outside the vocabulary
    input_ids = input_ids.masked_fill(~attention_mask.bool(), 0)
    T = input_ids.shape[1]
    cuts = sorted(set(starts.tolist()) | {0}) + [T]
    state = model.init_state(input_ids.shape[0], device=input_ids.device)
    logits = []
    for begin, end in zip(cuts[:-1], cuts[1:]):
        if begin > 0:
            state.reset(starts == begin)  # these rows' padding is forgotten: a fresh stream from here
        out = model(input_ids[:, begin:end], state=state)
        logits.append(out.logits)
        state = out.state
    return MMRecOutput(logits=torch.cat(logits, dim=1), loss=None, state=state)
