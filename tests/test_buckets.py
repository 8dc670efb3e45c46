"""Aspect-ratio buckets (data.buckets): images keep their aspect ratio at about the training area, batches
are drawn within a bucket, and the sample stream stays a pure function of the seed (resume, devices)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import check_resume, compose, run_train
from PIL import Image

from conceptlab.data import (
    ConceptDataModule,
    StreamSampler,
    bucket_sizes,
    choose_bucket,
    fit,
    read_concept_images,
)

SIZES = [(80, 40), (84, 40), (40, 80), (60, 60), (90, 44), (30, 70)]  # width x height


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    for k, size in enumerate(SIZES):
        image = Image.new("RGB", size, (40 * k, 100, 200 - 30 * k))
        image.paste((255, 255, 255), (0, 0, size[0] // 4, size[1]))  # a band on the left: crops show
        image.save(folder / f"{k}.png")
    return folder


def test_buckets_hold_about_the_training_area_in_multiples_the_backbone_takes():
    for resolution, multiple in ((512, 64), (1024, 64), (64, 16)):
        sizes = bucket_sizes(resolution, multiple)
        assert (resolution, resolution) in sizes
        for width, height in sizes:
            assert width % multiple == 0 and height % multiple == 0
            assert resolution // 2 <= min(width, height) and max(width, height) <= 2 * resolution
            assert width * height <= resolution**2 and (height, width) in sizes
        # none could grow a side by `multiple` within resolution² (and twice the resolution)
        grows = [(w + multiple, h) for w, h in sizes] + [(w, h + multiple) for w, h in sizes]
        assert not [
            g for g in grows if g[0] * g[1] <= resolution**2 and max(g) <= 2 * resolution and g not in sizes
        ]
    sizes = bucket_sizes(512, 64)
    assert choose_bucket((1000, 500), sizes) == (
        704,
        320,
    )  # ratio 2.2, the nearest to 2 (640x384: 1.67, 768x320: 2.4)
    assert choose_bucket((300, 300), sizes) == (512, 512)
    landscape = choose_bucket((1200, 800), sizes)
    assert landscape[0] > landscape[1] and choose_bucket((800, 1200), sizes) == landscape[::-1]
    ratio = math.log(1.5)
    assert all(
        abs(math.log(landscape[0] / landscape[1]) - ratio) <= abs(math.log(w / h) - ratio) for w, h in sizes
    )


def test_fit_crops_only_what_the_ratio_needs():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 50))  # white band on the left tenth
    square = fit(image, (32, 32))
    assert square.size == (32, 32) and square.getpixel((0, 16)) == (0, 0, 0)  # the square crop lost the band
    wide = fit(image, (64, 32))  # the image's own ratio: nothing cropped
    assert wide.size == (64, 32) and wide.getpixel((1, 16))[0] > 200


def test_a_bucketed_stream_batches_within_a_bucket_and_resumes_and_shards_exactly():
    buckets = [[0, 1, 2, 3, 4], [5], [6, 7]]
    sampler = StreamSampler(
        8, batch_size=2, world_size=1, rank=0, seed=3, batches_per_epoch=50, buckets=buckets
    )
    items = list(sampler)
    of = {k: b for b, images in enumerate(buckets) for k in images}
    batches = [items[i : i + 2] for i in range(0, len(items), 2)]
    assert all(of[a] == of[b] for (a, _), (b, _) in batches)  # one bucket per batch
    assert [p for _, p in items] == list(range(100))  # positions as without buckets
    per_pass = 3 + 1 + 1  # ceil(5/2) + ceil(1/2) + ceil(2/2) batches
    first_pass = [k for batch in batches[:per_pass] for k, _ in batch]
    assert set(first_pass) == set(range(8))  # every image in every pass
    # resumed at batch 20: the batches an uninterrupted stream has there
    resumed = StreamSampler(8, 2, 1, 0, seed=3, batches_per_epoch=50, next_batch=20, buckets=buckets)
    assert list(resumed)[:10] == items[40:50]
    # two devices with batch 2 see what one device with batch 4 sees
    single = list(StreamSampler(8, 4, 1, 0, seed=3, batches_per_epoch=10, buckets=buckets))
    ranks = [list(StreamSampler(8, 2, 2, r, seed=3, batches_per_epoch=10, buckets=buckets)) for r in (0, 1)]
    merged = [item for b in range(10) for r in (0, 1) for item in ranks[r][2 * b : 2 * b + 2]]
    assert merged == single


def test_a_run_keeps_each_images_aspect_ratio(tmp_path, shapes):
    summary = run_train(
        tmp_path / "run",
        f"data.path={shapes}",
        "data.buckets=true",
        "data.batch_size=2",
        "trainer.max_steps=3",
    )
    assert summary["status"] == "completed"
    assert sum(summary["buckets"].values()) == len(SIZES) and len(summary["buckets"]) > 2
    cfg = compose(["model=tiny", f"data.path={shapes}", "data.buckets=true"])
    from conceptlab.backbone import load_backbone

    backbone = load_backbone(cfg.model)
    images = read_concept_images(cfg.data)
    data = ConceptDataModule(cfg.data, images, backbone, "<shapes>", 0, 64)
    data.setup()
    factor = backbone.vae_scale_factor
    for image, size, mean in zip(images, data.sizes, data.dataset.mean):
        width, height = image.image.size
        assert (
            abs(math.log(size[0] / size[1]) - math.log(width / height)) < 0.45
        )  # the image's shape, roughly
        assert tuple(mean.shape[-2:]) == (size[1] // factor, size[0] // factor)
    assert {f"{w}x{h}": len(k) for (w, h), k in data.buckets.items()} == summary["buckets"]
    batch = next(iter(data.train_dataloader()))
    assert batch["latents"].shape[0] == cfg.data.batch_size  # a bucket of fewer fills up with its own images


@pytest.mark.slow
def test_a_bucketed_run_resumes_bit_for_bit(tmp_path, shapes):
    check_resume(
        tmp_path,
        "data.buckets=true",
        "data.batch_size=2",
        file=f"{shapes.name}.safetensors",
        data=f"data.path={shapes}",
    )


def test_buckets_off_trains_on_squares_as_before(tmp_path, shapes):
    cfg = compose(["model=tiny", f"data.path={shapes}"])
    from conceptlab.backbone import load_backbone

    backbone = load_backbone(cfg.model)
    data = ConceptDataModule(cfg.data, read_concept_images(cfg.data), backbone, "<shapes>", 0, 64)
    data.setup()
    assert isinstance(data.dataset.mean, torch.Tensor) and data.dataset.mean.shape[-2:] == (8, 8)
    assert data.bucket_counts() == {"64x64": len(SIZES)}
