"""P x K identity batches: P random identities, K images of each, for the triplet and MGAT losses."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch


class PKBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields index lists of P*K: identity-major (the K images of one identity are adjacent).

    Identities with fewer than K images are sampled with replacement. One epoch is about as
    many images as the dataset holds. Each epoch reshuffles from ``seed + epoch`` (and the
    rank, for multi-GPU), so a resumed run and every process draw reproducible batches.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if p < 1 or k < 1:
            raise ValueError("batch P and K must be at least 1")
        self.by_id: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self.by_id[int(label)].append(index)
        self.ids = sorted(self.by_id)
        if len(self.ids) < p:
            raise ValueError(f"P={p} identities per batch but the training set has only {len(self.ids)}")
        self.p, self.k = p, k
        self.seed, self.rank = seed, rank
        self.epoch = 0
        # Under DDP every rank draws its own batches: together they still cover about one dataset.
        self.num_batches = max(1, len(labels) // (p * k * world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 101 + self.rank)
        num_ids = len(self.ids)
        order = torch.randperm(num_ids, generator=g).tolist()
        cursor = 0
        for _ in range(self.num_batches):
            if cursor + self.p > num_ids:  # identities run out: reshuffle, so each is seen about equally
                order = torch.randperm(num_ids, generator=g).tolist()
                cursor = 0
            batch = []
            for i in order[cursor : cursor + self.p]:
                pool = self.by_id[self.ids[i]]
                if len(pool) >= self.k:
                    picks = torch.randperm(len(pool), generator=g)[: self.k].tolist()
                else:
                    picks = torch.randint(0, len(pool), (self.k,), generator=g).tolist()
                batch.extend(pool[j] for j in picks)
            cursor += self.p
            yield batch
