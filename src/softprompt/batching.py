"""Length-grouped, dynamically padded batches of token ids.

Training order is deterministic given (seed, epoch): a seeded permutation, cut into chunks of
many steps, each chunk sorted by length and split into optimizer steps, the steps shuffled.
Rows of similar length share a batch, so little compute goes to pads.
"""

from __future__ import annotations

import torch

from softprompt.encode import IGNORE_INDEX

GROUP_STEPS = 50  # optimizer steps per length-sorting chunk


def step_order(lengths: list[int], step_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices for each optimizer step of one epoch (the last step may be short)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = step_size * GROUP_STEPS
    steps: list[list[int]] = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        steps.extend(group[i:i + step_size] for i in range(0, len(group), step_size))
    perm = torch.randperm(len(steps), generator=gen).tolist()
    return [steps[i] for i in perm]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int,
            device: torch.device | str = "cpu", side: str = "left") -> dict[str, torch.Tensor]:
    """Pad ``(ids, labels)`` rows (on the left, or on the ``"right"``) into ``input_ids``,
    ``attention_mask`` and ``labels``, each ``[B, T]``."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        n = len(ids)
        if n:
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            input_ids[i, cols] = torch.tensor(ids)
            labels[i, cols] = torch.tensor(lab)
            mask[i, cols] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), for evaluation."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
