"""`--group_by_modality_length`: batches of one modality (image rows or text-only rows) and similar length.

Like LLaVA's `LengthGroupedSampler(group_by_modality=True)`, reading signed lengths (positive = image row,
negative = text-only, `ExampleDataset.modality_lengths`), with two differences: lengths are really grouped (LLaVA's
mega-batch is one optimiser step, so with one GPU it only balances ranks), and the order is a pure function of
(seed, epoch), so runs and resumed runs repeat it exactly.

The sampler yields indices of the whole dataset; with several processes accelerate deals consecutive batches out
to the ranks, so each run of `world_size * batch_size` indices is one step of similar lengths on every rank. Plug it
into a Trainer subclass:

    def _get_train_sampler(self, train_dataset=None):
        return ModalityLengthGroupedSampler(self.train_dataset.modality_lengths, self.args.train_batch_size,
                                            world_size=self.args.world_size, seed=self.args.seed)

The Trainer calls `set_epoch` at every epoch, which reshuffles.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

MEGA_BATCH_STEPS = 50  # steps sorted together: more groups lengths more tightly, fewer keeps batches more random


def grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int = 1, *, seed: int = 0,
                    mega_batch_steps: int = MEGA_BATCH_STEPS) -> list[int]:
    """A permutation of range(len(lengths)) in steps of `world_size * batch_size` indices, each step of one
    modality (sign of its length) and of similar lengths; steps in random order, the longest step first (an
    out-of-memory shows up at once), the two modalities' incomplete last steps together at the end."""
    import torch

    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
    generator = torch.Generator().manual_seed(seed)
    step = batch_size * world_size
    steps: list[list[int]] = []
    leftover: list[int] = []
    for modality in (1, -1):
        members = [i for i, n in enumerate(lengths) if (n >= 0) == (modality > 0)]
        if not members:
            continue
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        chunk = step * mega_batch_steps
        for start in range(0, len(order), chunk):
            mega = sorted(order[start:start + chunk], key=lambda i: abs(lengths[i]), reverse=True)
            steps += [mega[k:k + step] for k in range(0, len(mega), step)]
        if len(steps[-1]) < step:  # the incomplete step of this modality
            leftover += steps.pop()
    steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    if steps:
        longest = max(range(len(steps)), key=lambda s: abs(lengths[steps[s][0]]))
        steps.insert(0, steps.pop(longest))
    return [i for s in steps for i in s] + leftover


class ModalityLengthGroupedSampler:
    """A torch Sampler over `grouped_indices`, reshuffled per epoch (seed + epoch); plain length grouping when
    every row has the same modality."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, world_size: int = 1, seed: int = 0,
                 mega_batch_steps: int = MEGA_BATCH_STEPS):
        if any(n == 0 for n in lengths):
            raise ValueError("a length of 0 has no modality sign; lengths must be non-zero")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.mega_batch_steps = mega_batch_steps
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_indices(self.lengths, self.batch_size, self.world_size, seed=self.seed + self.epoch,
                                    mega_batch_steps=self.mega_batch_steps))
