"""Which dataset each global sample comes from, and where in that dataset's stream it starts.

Global sample `g` (counted over the whole job, in the order the job consumes them) belongs to
one dataset, chosen by a periodic schedule: over a period of `SCHEDULE_PERIOD` samples, each
slot goes to the dataset furthest behind its weight (largest deficit), so every prefix of the
schedule is within a sample or so of the weights. A dataset's `j`-th sample is the `j`-th window
of `sample_tokens` tokens of its stream, optionally permuted within blocks of `shuffle_buffer`
windows. Everything is a pure function of integers, so the plan (plus the count of samples
consumed) is the whole loader state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_loader.stream import SAMPLE_ORDER, LRUCache, seeded_rng

SCHEDULE_PERIOD = 10_000


class MixingSchedule:
    """Largest-deficit assignment of sample slots to datasets, repeating every SCHEDULE_PERIOD."""

    def __init__(self, weights: list[float]):
        weights_array = np.asarray(weights, np.float64)
        self.dataset_of_slot = np.empty(SCHEDULE_PERIOD, np.int32)
        # taken_before[k, d]: slots among the first k of a period that went to dataset d.
        self.taken_before = np.zeros((SCHEDULE_PERIOD + 1, len(weights)), np.int64)
        taken = np.zeros(len(weights), np.int64)
        for slot in range(SCHEDULE_PERIOD):
            dataset = int(np.argmax(weights_array * (slot + 1) - taken))
            taken[dataset] += 1
            self.dataset_of_slot[slot] = dataset
            self.taken_before[slot + 1] = taken

    def taken(self, samples: int) -> np.ndarray:
        """Samples each dataset contributed among the first `samples` of the schedule."""
        periods, slot = divmod(samples, SCHEDULE_PERIOD)
        return periods * self.taken_before[SCHEDULE_PERIOD] + self.taken_before[slot]

    def locate(self, sample: int) -> tuple[int, int]:
        """(dataset, index of the sample among that dataset's samples)."""
        periods, slot = divmod(sample, SCHEDULE_PERIOD)
        dataset = int(self.dataset_of_slot[slot])
        return dataset, periods * int(self.taken_before[SCHEDULE_PERIOD, dataset]) + int(self.taken_before[slot, dataset])


@dataclass
class MixPlan:
    """How global samples from `base_sample` on map onto the dataset streams."""

    seed: int
    sample_tokens: int
    """Tokens per sample: seq_len + 1."""
    shuffle_buffer: int
    base_sample: int
    """Global sample count at which these weights took effect (0, or the step of a re-base)."""
    names: list[str]
    weights: list[float]
    """Normalised; sum 1."""
    tokens_at_base: list[int]
    """Per dataset, stream tokens consumed before `base_sample` (always a prefix of the stream)."""


class SampleMapper:
    """Global sample index -> (dataset, stream position), for one plan."""

    def __init__(self, plan: MixPlan):
        self.plan = plan
        self.schedule = MixingSchedule(plan.weights)
        self._block_orders = LRUCache(8 * len(plan.names))

    def dataset_samples(self, samples_seen: int) -> np.ndarray:
        """Samples each dataset has contributed since the base, once `samples_seen` were consumed."""
        return self.schedule.taken(samples_seen - self.plan.base_sample)

    def tokens_consumed(self, samples_seen: int, *, whole_blocks: bool = False) -> list[int]:
        """Stream tokens of each dataset consumed once `samples_seen` global samples were.

        With a shuffle buffer the consumed samples of an unfinished block are scattered in it;
        `whole_blocks` counts such a block as consumed, which gives a prefix of the stream.
        """
        taken = self.dataset_samples(samples_seen)
        block = self.plan.shuffle_buffer
        if whole_blocks and block > 1:
            taken = -(-taken // block) * block
        return [base + int(n) * self.plan.sample_tokens for base, n in zip(self.plan.tokens_at_base, taken)]

    def locate(self, sample: int) -> tuple[int, int]:
        """(dataset, stream position of the sample's first token) for global sample `sample`."""
        dataset, index = self.schedule.locate(sample - self.plan.base_sample)
        return dataset, self.position(dataset, index)

    def position(self, dataset: int, index: int) -> int:
        """Stream position of the first token of the dataset's `index`-th sample since the base."""
        block = self.plan.shuffle_buffer
        if block > 1:
            block_number, within = divmod(index, block)
            order = self._block_orders.get((dataset, block_number), self._block_order)
            index = block_number * block + int(order[within])
        return self.plan.tokens_at_base[dataset] + index * self.plan.sample_tokens

    def _block_order(self, key: tuple[int, int]) -> np.ndarray:
        dataset, block_number = key
        plan = self.plan
        rng = seeded_rng(plan.seed, plan.names[dataset], SAMPLE_ORDER, plan.tokens_at_base[dataset], block_number)
        return rng.permutation(plan.shuffle_buffer)
