"""Aspect-ratio buckets (kohya's `--enable_bucket`): images trained at their own shape, not cropped to a square.

A bucket is a (width, height) in pixels whose sides are multiples of `steps` in [min_reso, max_reso] and whose area
is at most image_size², the square's pixel budget. The bucket list is kohya's `make_bucket_resolutions`: for each
width w the largest such height, and each (w, h) also as (h, w). An image goes to the bucket whose aspect ratio
w/h is nearest its own (ties: the bucket whose area is nearest the image's), is resized to cover it and
centre-cropped to it. With `no_upscale`, each image has a bucket of its own: its size, scaled down (never up) to fit
the budget and max_reso, each side rounded down to `steps`; the image is scaled so, and the remainder cropped.

Batches are drawn from one bucket each, so that every batch has one shape. Per epoch, from a generator seeded by
(seed, epoch): each bucket's rows are shuffled and cut into batches (the last one filled up with the bucket's first
rows again, so that every batch has the full size and each process its slice), then the order of all the batches
is shuffled. Step s takes batch s of the epochs laid end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BucketSpec:
    """The bucket settings of a run (the `--*-bucket-*` flags)."""

    image_size: int  # the pixel budget is image_size²
    min_reso: int = 256
    max_reso: int = 1024
    steps: int = 64
    no_upscale: bool = False


def bucket_resolutions(spec: BucketSpec) -> list[tuple[int, int]]:
    """Kohya's bucket list, sorted: the largest square within the budget, and for each width w (a multiple of
    `steps` from min_reso to max_reso) the tallest height h ≤ max_reso with w·h ≤ image_size², in both orientations
    where h ≥ min_reso."""
    area = spec.image_size**2
    square = math.isqrt(area) // spec.steps * spec.steps
    found = {(square, square)}
    for width in range(spec.min_reso, spec.max_reso + 1, spec.steps):
        height = min(spec.max_reso, area // width // spec.steps * spec.steps)
        if height >= spec.min_reso:
            found |= {(width, height), (height, width)}
    return sorted(found)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of the aspect ratio nearest the image's (kohya compares w/h directly, not its logarithm); among
    equal ones, the bucket of the nearest area, so that an image of a bucket's exact size lands in it."""
    ratio = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), abs(b[0] * b[1] - width * height)))


def fit_scale(width: int, height: int, spec: BucketSpec) -> float:
    """`no_upscale`'s scale of an image: 1, or less where it is larger than the budget or than max_reso."""
    return min(1.0, math.sqrt(spec.image_size**2 / (width * height)), spec.max_reso / width, spec.max_reso / height)


def own_bucket(width: int, height: int, spec: BucketSpec) -> tuple[int, int]:
    """`no_upscale`'s bucket of an image: its size scaled down (never up) to the budget and to max_reso, each side
    rounded down to `steps` (so the image always covers it). A side may come out below min_reso; `bucket_for`
    refuses it."""
    scale = fit_scale(width, height, spec)
    return (int(width * scale) // spec.steps * spec.steps, int(height * scale) // spec.steps * spec.steps)


def bucket_for(width: int, height: int, spec: BucketSpec, buckets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The bucket of an image of this size, or None where `no_upscale` leaves a side below min_reso."""
    if not spec.no_upscale:
        return nearest_bucket(width, height, buckets)
    bucket = own_bucket(width, height, spec)
    return bucket if min(bucket) >= spec.min_reso else None


def cover_and_crop(
    width: int, height: int, bucket: tuple[int, int], spec: BucketSpec | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, height), (crop top, left)): the image scaled by max(bw/w, bh/h) so that it just covers the
    bucket (with `no_upscale`, by its own `fit_scale`, as kohya: an image within the budget is cropped, not
    resampled), and the centre crop of the bucket's size in it (generative-models' crop_coords_top_left)."""
    bw, bh = bucket
    scale = fit_scale(width, height, spec) if spec and spec.no_upscale else max(bw / width, bh / height)
    resized = (max(bw, round(width * scale)), max(bh, round(height * scale)))
    return resized, ((resized[1] - bh) // 2, (resized[0] - bw) // 2)


# Batches ---------------------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's data order (the same as `step.global_batch_indices`' for the square data)."""
    return seed * 7919 + epoch


class BucketBatches:
    """The global batches of every epoch for rows with these buckets (module docstring); `rows(step)`."""

    def __init__(self, row_buckets: list[tuple[int, int]], batch_size: int, seed: int):
        self.row_buckets, self.batch_size, self.seed = list(row_buckets), batch_size, seed
        self.groups: dict[tuple[int, int], list[int]] = {}
        for row, bucket in enumerate(row_buckets):
            self.groups.setdefault(bucket, []).append(row)
        self.per_epoch = sum(math.ceil(len(rows) / batch_size) for rows in self.groups.values())
        self._epoch: tuple[int, list[list[int]]] | None = None  # the last epoch's batches: steps come in order

    def epoch(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s batches, in their order."""
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            batches = []
            for bucket in sorted(self.groups):  # a fixed order, whatever order the rows came in
                rows = self.groups[bucket]
                shuffled = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
                count = math.ceil(len(rows) / self.batch_size)
                # the last batch filled up by repeating the bucket's rows: every batch has batch_size samples
                filled = (shuffled * math.ceil(count * self.batch_size / len(rows)))[: count * self.batch_size]
                batches += [filled[k * self.batch_size : (k + 1) * self.batch_size] for k in range(count)]
            order = torch.randperm(len(batches), generator=g).tolist()
            self._epoch = (epoch, [batches[i] for i in order])
        return self._epoch[1]

    def rows(self, step: int) -> list[int]:
        """The rows of optimizer step `step`'s global batch, all of one bucket."""
        epoch, k = divmod(step, self.per_epoch)
        return self.epoch(epoch)[k]
