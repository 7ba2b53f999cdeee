"""Token lists → padded arrays and masks, the two layouts every batch uses.

    left  padding   [pad pad x x x]   prompts that will be continued (generation, rollouts): the
                                      next token is always predicted at the last column
    right padding   [x x x pad pad]   training sequences and responses: token t sits at column t

Masks are float32, 1 on real tokens. Positions inside the model come from the attention mask
(the cumulative count of real tokens), so the same sequence gets the same positions either way.
"""
import numpy as np


def pad_batch(sequences, pad_id=0, side="left"):
    """Stack token lists into ids (B, T) int64 and mask (B, T) float32 (1 = real token)."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side must be 'left' or 'right', got {side!r}")
    sequences = [list(s) for s in sequences]
    if not sequences:
        raise ValueError("pad_batch: sequences is empty; expected at least one sequence")
    T = max(len(s) for s in sequences)
    ids = np.full((len(sequences), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), T), dtype=np.float32)
    for i, s in enumerate(sequences):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = s
        mask[i, cols] = 1
    return ids, mask


def pad_prompt_response(rows, pad_id):
    """Right-padded prompt ⧺ response sequences: ids, attention mask and response mask, each (B, T).

    ``rows``: (prompt_ids, response_ids) pairs; the response mask is 1 exactly on the response tokens.
    """
    ids, mask = pad_batch([list(p) + list(y) for p, y in rows], pad_id, side="right")
    response = np.zeros_like(mask)
    for i, (p, y) in enumerate(rows):
        response[i, len(p):len(p) + len(y)] = 1
    return ids, mask, response
