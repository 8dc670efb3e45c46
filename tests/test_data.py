"""Concept images in, checked and converted; a sample stream that resumes and shards exactly."""

import logging

import numpy as np
import pytest
import torch
from conftest import DREAMBOOTH
from PIL import Image

from conceptlab.config import DataConfig
from conceptlab.data import (
    ConceptDataModule,
    StreamSampler,
    fill_template,
    load_templates,
    read_concept_images,
    resolve_data_path,
)
from conceptlab.errors import ConceptDataError, ConfigError
from conceptlab.example_sets import EXAMPLE_SETS


def write(path, mode="RGB", size=(40, 30), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(ConceptDataError, match="does not exist; set data.path"):
        read_concept_images(DataConfig(path=str(tmp_path / "nope")))


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConceptDataError, match="no images in .*looked for .png .jpg"):
        read_concept_images(DataConfig(path=str(tmp_path)))


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog):
    write(tmp_path / "a.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with caplog.at_level(logging.WARNING):
        images = read_concept_images(DataConfig(path=str(tmp_path)))
    assert [im.path.name for im in images] == ["a.png"]
    assert "broken.jpg" in caplog.text


def test_only_unreadable_files_is_an_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ConceptDataError, match="none of the files .* is a readable image"):
        read_concept_images(DataConfig(path=str(tmp_path)))


@pytest.mark.parametrize(
    "mode,value",
    [
        ("L", 77),
        ("RGBA", (10, 20, 30, 0)),
        ("I;16", 40000),
        ("P", 3),
        ("LA", (5, 255)),
        ("CMYK", (0, 0, 0, 0)),
    ],
)
def test_odd_modes_become_rgb(tmp_path, mode, value):
    write(tmp_path / "img.png" if mode != "CMYK" else tmp_path / "img.jpg", mode, value=value)
    [image] = read_concept_images(DataConfig(path=str(tmp_path)))
    assert image.image.mode == "RGB"
    if mode == "RGBA":  # fully transparent pixels are composited over white
        assert image.image.getpixel((0, 0)) == (255, 255, 255)
    if mode == "I;16":  # 16-bit values are scaled, not clipped
        assert image.image.getpixel((0, 0))[0] == round(40000 / 65535 * 255)


def test_huge_jpeg_is_decoded_reduced(tmp_path):
    Image.new("RGB", (6000, 4000), (200, 10, 10)).save(tmp_path / "huge.jpg", quality=80)
    [image] = read_concept_images(DataConfig(path=str(tmp_path), resolution=64))
    assert image.image.mode == "RGB" and max(image.image.size) < 6000


def test_num_images_larger_than_folder(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.png")
    with pytest.raises(ConceptDataError, match="num_images=5 but the folder holds only 3"):
        read_concept_images(DataConfig(path=str(tmp_path), num_images=5))
    with pytest.raises(ConfigError, match="at least 1"):
        read_concept_images(DataConfig(path=str(tmp_path), num_images=0))


def test_filewords_use_the_caption_beside_each_image(tmp_path):
    write(tmp_path / "cat_01.png")
    (tmp_path / "cat_01.txt").write_text("sitting on a sofa\n")
    write(tmp_path / "dog-2.png")
    images = read_concept_images(DataConfig(path=str(tmp_path), templates="filewords"))
    assert [im.caption for im in images] == ["sitting on a sofa", "dog"]
    assert (
        fill_template("a photo of a [name], [filewords]", "<c>", images[0].caption)
        == "a photo of a <c>, sitting on a sofa"
    )


def test_template_file(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# mine\n{} on a table\na [name] sketch\n\n")
    assert load_templates(str(good)) == ["{} on a table", "a [name] sketch"]
    bad = tmp_path / "bad.txt"
    bad.write_text("{} ok\nno placeholder here\n")
    with pytest.raises(ConceptDataError, match="template 2 'no placeholder here' has no"):
        load_templates(str(bad))
    with pytest.raises(ConfigError, match="neither object, style, filewords, bare nor a template file"):
        load_templates("objcet")


def test_bundled_examples_are_what_their_code_draws():
    for name, (draw, count) in EXAMPLE_SETS.items():
        images = read_concept_images(DataConfig(path=f"bundled:{name}", templates="filewords"))
        assert len(images) == count
        for i, image in enumerate(images):
            drawn, caption = draw(i)
            assert np.array_equal(np.asarray(image.image), np.asarray(drawn)), f"{name}/{i:02d}.png is stale"
            assert image.caption == caption


def test_unknown_bundled_set_lists_the_available_ones():
    with pytest.raises(ConceptDataError, match="available: ink, robot"):
        read_concept_images(DataConfig(path="bundled:nope"))


def test_sampler_resumes_exactly_where_it_stopped():
    uninterrupted = StreamSampler(5, batch_size=2, world_size=1, rank=0, seed=3, batches_per_epoch=7)
    two_epochs = list(uninterrupted) + list(uninterrupted)
    resumed = StreamSampler(5, 2, 1, 0, seed=3, batches_per_epoch=7, next_batch=4)
    rest_of_epoch = list(resumed)
    assert len(rest_of_epoch) == (7 - 4) * 2
    assert rest_of_epoch + list(resumed) == two_epochs[4 * 2 :]


def test_ranks_split_the_global_batch_of_one_process():
    single = list(StreamSampler(5, batch_size=4, world_size=1, rank=0, seed=0, batches_per_epoch=6))
    ranks = [list(StreamSampler(5, 2, world_size=2, rank=r, seed=0, batches_per_epoch=6)) for r in (0, 1)]
    for g in range(6):
        assert ranks[0][2 * g : 2 * g + 2] + ranks[1][2 * g : 2 * g + 2] == single[4 * g : 4 * g + 4]


def test_every_image_is_shown_once_per_pass():
    positions = list(StreamSampler(5, 5, 1, 0, seed=1, batches_per_epoch=4))
    for k in range(4):
        assert sorted(i for i, _ in positions[5 * k : 5 * k + 5]) == [0, 1, 2, 3, 4]


def test_latents_are_cached_once_per_flip_and_samples_are_reproducible(backbone):
    cfg = DataConfig(path="bundled:robot", batch_size=2)
    dm = ConceptDataModule(cfg, read_concept_images(cfg), backbone, "<robot>", seed=0, resolution=64)
    dm.setup("fit")
    assert dm.dataset.mean.shape == (5, 2, 4, 8, 8)  # images, flips, latent channels, 64/8, 64/8
    a, b = dm.dataset[(1, 17)], dm.dataset[(1, 17)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["noise"], dm.dataset[(1, 18)]["noise"])
    assert dm.captions[0][0] == "a photo of a <robot>"


def test_resolution_must_fit_the_backbone(backbone):
    cfg = DataConfig(path="bundled:robot")
    with pytest.raises(ConfigError, match="multiple of 16"):
        ConceptDataModule(cfg, read_concept_images(cfg), backbone, "<robot>", seed=0, resolution=70)


@pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="../shared/datasets/dreambooth is not present")
def test_real_photos_from_the_dreambooth_set(backbone):
    """Real JPEGs of many sizes and aspect ratios go through the same path to latents."""
    cfg = DataConfig(path=str(DREAMBOOTH / "cat"), num_images=3)
    images = read_concept_images(cfg)
    assert len(images) == 3 and all(im.image.mode == "RGB" for im in images)
    dm = ConceptDataModule(cfg, images, backbone, "<cat>", seed=0, resolution=64)
    dm.setup("fit")
    assert torch.isfinite(dm.dataset.mean).all()


def test_min_snr_weights_follow_the_formula_per_timestep(backbone):
    """optim.snr_gamma: w_t = min(SNR_t, γ) / SNR_t (noise prediction) or / (SNR_t + 1) (v-prediction),
    SNR_t = ᾱ_t / (1 - ᾱ_t), for every timestep of the backbone's schedule."""
    from conceptlab.data import snr_weights

    alphas = backbone.scheduler.alphas_cumprod
    gamma = 5.0
    eps, v = snr_weights(alphas, gamma, False), snr_weights(alphas, gamma, True)
    assert eps.shape == v.shape == (len(alphas),)
    for t in (0, 10, 100, 250, 500, 999):
        snr = float(alphas[t]) / (1 - float(alphas[t]))
        assert float(eps[t]) == pytest.approx(min(snr, gamma) / snr, rel=1e-5)
        assert float(v[t]) == pytest.approx(min(snr, gamma) / (snr + 1), rel=1e-5)
    snr = alphas / (1 - alphas)
    assert torch.all(eps[snr <= gamma] == 1)
    assert torch.all(eps[snr > gamma] < 1)  # only the least noisy timesteps are weighted down


def test_min_snr_and_noise_offset_change_the_samples_and_the_loss_as_defined(backbone):
    """With optim.snr_gamma each sample carries its timestep's weight and the loss is the weighted mean of
    the samples' errors; with optim.noise_offset the noise moves by a constant per channel and sample,
    every other draw the same. Batches of both kinds in one pass (a pack's) keep each its own loss."""
    from conceptlab.data import snr_weights
    from conceptlab.module import diffusion_losses

    cfg = DataConfig(path="bundled:robot", batch_size=2)
    images = read_concept_images(cfg)

    def dataset(**knobs):
        dm = ConceptDataModule(cfg, images, backbone, "<robot>", seed=0, resolution=64, **knobs)
        dm.setup("fit")
        return dm.dataset

    plain, tuned = dataset(), dataset(snr_gamma=5.0, noise_offset=0.1)
    a, b = plain[(1, 17)], tuned[(1, 17)]
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["timesteps"], b["timesteps"])
    shift = b["noise"] - a["noise"]
    assert not torch.allclose(shift, torch.zeros_like(shift))
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6)  # one draw per channel
    weights = snr_weights(backbone.scheduler.alphas_cumprod, 5.0, False)
    assert float(b["loss_weight"]) == float(weights[b["timesteps"]]) and "loss_weight" not in a

    def batch(data, positions):
        items = [data[(i, p)] for i, p in positions]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    weighted, unweighted = batch(tuned, [(0, 7), (0, 3)]), batch(plain, [(1, 5), (3, 9)])
    assert weighted["loss_weight"].tolist() == pytest.approx([0.10006, 1.0], abs=1e-4)  # t = 21 and 983
    with torch.no_grad():
        together = diffusion_losses(backbone, [weighted, unweighted])
        alone = [diffusion_losses(backbone, [weighted])[0], diffusion_losses(backbone, [unweighted])[0]]
        by_hand = []
        for row in range(2):  # each sample's own error, times its weight, averaged
            one = {k: v[row : row + 1] for k, v in weighted.items() if k != "loss_weight"}
            by_hand.append(diffusion_losses(backbone, [one])[0] * weighted["loss_weight"][row])
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together[1], alone[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alone[0], (by_hand[0] + by_hand[1]) / 2, rtol=1e-4, atol=1e-6)


def masked_set(folder):
    """Three of the robot's pictures: the first with its left half transparent, the second without an alpha
    channel, the third fully opaque RGBA."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(resolve_data_path("bundled:robot").glob("*.png"))[:3]
    for k, source in enumerate(sources):
        image = Image.open(source).convert("RGB")
        if k != 1:
            alpha = np.full((image.height, image.width), 255, np.uint8)
            if k == 0:
                alpha[:, : image.width // 2] = 0
            image = Image.fromarray(np.dstack([np.asarray(image), alpha]), "RGBA")
        image.save(folder / f"{k:02d}.png")
    return folder


def test_alpha_masks_weight_the_loss_per_latent_pixel_and_unmasked_images_train_whole(backbone, tmp_path):
    cfg = DataConfig(path=str(masked_set(tmp_path / "set")), mask="alpha", flip_p=0.5)
    images = read_concept_images(cfg)
    assert [im.mask is not None for im in images] == [True, False, True]
    dm = ConceptDataModule(cfg, images, backbone, "<robot>", seed=0, resolution=64)
    dm.setup("fit")
    masks = dm.dataset.masks
    assert masks.shape == (3, 2, 1, 8, 8)  # images, flips, one channel, the latent grid
    assert torch.all(masks[0, 0, :, :, :3] == 0) and torch.all(masks[0, 0, :, :, 5:] == 1)  # the edge between
    assert masks.min() >= 0 and masks.max() <= 1
    assert torch.equal(masks[0, 1], masks[0, 0].flip(-1))  # the flipped view's mask is mirrored
    assert torch.all(masks[1] == 1) and torch.all(masks[2] == 1)
    assert dm.dataset[(0, 3)]["loss_mask"].shape == (1, 8, 8)
    unmasked = DataConfig(path=cfg.path)
    plain = ConceptDataModule(
        unmasked, read_concept_images(unmasked), backbone, "<robot>", seed=0, resolution=64
    )
    plain.setup("fit")
    assert plain.dataset.masks is None and "loss_mask" not in plain.dataset[(0, 3)]


def test_masked_pixels_contribute_no_gradient():
    from conceptlab.module import weighted_mse

    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :4] = 0
    loss = weighted_mse(prediction, target, mask=mask)
    loss.backward()
    assert torch.all(prediction.grad[..., :4] == 0) and torch.all(prediction.grad[..., 4:] != 0)
    torch.testing.assert_close(
        loss, ((prediction - target) ** 2 * mask).mean()
    )  # over every pixel, as kohya's
    weight = torch.tensor([0.5, 1.0])
    per_sample = ((prediction - target) ** 2 * mask).flatten(1).mean(1)
    torch.testing.assert_close(weighted_mse(prediction, target, weight, mask), (per_sample * weight).mean())


def test_folder_masks_of_another_size_or_a_missing_folder_are_one_line(tmp_path):
    folder = masked_set(tmp_path / "set")
    with pytest.raises(ConceptDataError, match=r"data\.mask=folder but .*masks is not a folder"):
        read_concept_images(DataConfig(path=str(folder), mask="folder"))
    (folder / "masks").mkdir()
    Image.new("L", (128, 128), 255).save(folder / "masks" / "00.png")
    images = read_concept_images(DataConfig(path=str(folder), mask="folder"))
    assert [im.mask is not None for im in images] == [True, False, False]
    Image.new("L", (10, 20), 255).save(folder / "masks" / "01.png")
    with pytest.raises(
        ConceptDataError, match=r"^mask .*01\.png is 10x20 but 01\.png is 128x128: make the mask"
    ):
        read_concept_images(DataConfig(path=str(folder), mask="folder"))
    with pytest.raises(ConfigError, match=r"^data\.mask='depth': use alpha, folder or null"):
        read_concept_images(DataConfig(path=str(folder), mask="depth"))


def tagged_set(folder):
    """The robot's first two pictures, each with a caption of comma-separated tags."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, source in enumerate(sorted(resolve_data_path("bundled:robot").glob("*.png"))[:2]):
        Image.open(source).save(folder / f"{k:02d}.png")
        (folder / f"{k:02d}.txt").write_text("robot, teal, toy, grass, sky, standing", encoding="utf-8")
    return str(folder)


def test_shuffled_tags_keep_the_first_tokens_and_are_drawn_once_per_run(backbone, tmp_path):
    from conceptlab.data import tag_orders

    cfg = DataConfig(path=tagged_set(tmp_path / "set"), templates="filewords", shuffle_tags=True, keep_tokens=2,
                     shuffle_orders=6)  # fmt: skip
    orders = tag_orders("robot, teal, toy, grass, sky, standing", cfg, seed=0, image=0)
    assert len(orders) == 6 and len(set(orders)) > 1
    assert all(o.startswith("robot, teal, ") for o in orders)
    assert all(
        sorted(o.split(", ")) == sorted(["robot", "teal", "toy", "grass", "sky", "standing"]) for o in orders
    )
    assert orders == tag_orders("robot, teal, toy, grass, sky, standing", cfg, seed=0, image=0)  # seeded
    assert orders != tag_orders("robot, teal, toy, grass, sky, standing", cfg, seed=1, image=0)
    dm = ConceptDataModule(cfg, read_concept_images(cfg), backbone, "<robot>", seed=0, resolution=64)
    templates = len(load_templates("filewords"))
    assert all(len(captions) == templates * 6 for captions in dm.captions)
    assert {c.split("<robot>, ", 1)[1] for c in dm.captions[0]} == set(orders)


def test_caption_dropout_draws_the_bare_template_at_its_rate_and_off_changes_nothing(backbone, tmp_path):
    path = tagged_set(tmp_path / "set")

    def dataset(**knobs):
        cfg = DataConfig(path=path, templates="filewords", **knobs)
        dm = ConceptDataModule(cfg, read_concept_images(cfg), backbone, "<robot>", seed=0, resolution=64)
        dm.setup("fit")
        return dm

    plain, dropped, always = dataset(), dataset(caption_dropout=0.3), dataset(caption_dropout=1.0)
    assert dropped.captions[0][-1] == "<robot>"  # the bare template {}
    bare = dropped.dataset.captions[0, -1]
    drawn = [dropped.dataset[(p % 2, p)] for p in range(400)]
    rate = sum(torch.equal(d["input_ids"], bare) for d in drawn) / len(drawn)
    assert 0.22 < rate < 0.38
    assert all(torch.equal(always.dataset[(0, p)]["input_ids"], bare) for p in range(20))
    for p in range(20):  # the other draws are the same with dropout on or off
        a, b = plain.dataset[(0, p)], dropped.dataset[(0, p)]
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["noise"], b["noise"])
        assert torch.equal(a["timesteps"], b["timesteps"])
        assert torch.equal(b["input_ids"], bare) or torch.equal(b["input_ids"], a["input_ids"])
