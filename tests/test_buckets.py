"""Aspect-ratio buckets (training/buckets.py, kohya's --enable_bucket): the bucket list and each image's bucket
against brute force, one shape per batch, SDXL's micro-conditioning from the true size and crop, exact resume,
the cache against no cache, control images in their image's bucket, tag shuffling, and bad input."""

import json
import random

import pytest
import torch
from PIL import Image

from latent_diffusion import load_model
from latent_diffusion.cli import main
from latent_diffusion.training import step as training_step
from latent_diffusion.training.buckets import BucketBatches, BucketSpec, bucket_resolutions, own_bucket
from latent_diffusion.training.config import TrainConfig, bucket_spec
from latent_diffusion.training.controlnet import ControlNetTrainConfig, train_controlnet
from latent_diffusion.training.data import ImageCaptionFolder, shuffle_tags
from latent_diffusion.training.diffusion import build_cache, train
from latent_diffusion.training.step import Run, make_batch

from conftest import tiny_model

SPEC = BucketSpec(image_size=64, min_reso=16, max_reso=128, steps=8)
BUCKETS = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=96, bucket_reso_steps=16)
FAST = dict(image_size=64, batch_size=4, lr=1e-3, warmup=2, log_every=1, quiet=True, device="cpu", ema_decay=0)
CPU = torch.device("cpu")


def picture_folder(root, sizes, control: bool = False):
    """Images of these (width, height), each a horizontal gradient with a stripe so that crops differ; captions of
    tags. control: a metadata.jsonl naming each image as its own control image."""
    root.mkdir()
    lines = []
    for i, (w, h) in enumerate(sizes):
        image = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        image.paste((255, 40 * (i % 6), 0), (w // 3, 0, w // 3 + 4, h))
        image.save(root / f"{i}.png")
        caption = f"picture {i}, tag a, tag b, tag c"
        lines.append(json.dumps({"file_name": f"{i}.png", "conditioning_image": f"{i}.png", "text": caption}))
        if not control:
            (root / f"{i}.txt").write_text(caption)
    if control:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


THREE_SHAPES = [(96, 48)] * 3 + [(40, 80)] * 3 + [(64, 64)] * 3  # wide, tall, square


def brute_force_buckets(spec: BucketSpec) -> set[tuple[int, int]]:
    """Every width's tallest height within the budget and the sides, both orientations, and the largest square."""
    sides = range(spec.steps, spec.max_reso + 1, spec.steps)
    found = {max((s, s) for s in sides if s * s <= spec.image_size**2)}
    for w in (s for s in sides if s >= spec.min_reso):
        heights = [h for h in sides if w * h <= spec.image_size**2]
        if heights and max(heights) >= spec.min_reso:
            found |= {(w, max(heights)), (max(heights), w)}
    return found


@pytest.mark.parametrize("spec", [SPEC, BucketSpec(64, 32, 96, 16), BucketSpec(64, 64, 64, 8)])
def test_the_bucket_list_is_kohyas(spec):
    buckets = bucket_resolutions(spec)
    assert set(buckets) == brute_force_buckets(spec) and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % spec.steps == 0 and h % spec.steps == 0
        assert spec.min_reso <= min(w, h) and max(w, h) <= spec.max_reso and w * h <= spec.image_size**2
    assert (64, 64) in buckets


def test_each_image_lands_in_the_bucket_of_the_nearest_aspect_ratio(tmp_path):
    rng = random.Random(0)
    sizes = [(rng.randrange(16, 97), rng.randrange(16, 97)) for _ in range(30)] + [(96, 48), (48, 96), (64, 64)]
    data = ImageCaptionFolder(picture_folder(tmp_path / "d", sizes), 64, buckets=SPEC)
    buckets = bucket_resolutions(SPEC)
    for i in range(len(data)):
        w, h = sizes[int(data.items[i][0].stem)]  # (the folder's items are sorted by name)
        bw, bh = data.bucket(i)
        best = min(abs(b[0] / b[1] - w / h) for b in buckets)  # brute force over the whole list
        assert (bw, bh) in buckets and abs(bw / bh - w / h) == best, (w, h, (bw, bh))
        item = data.load(i)
        assert item.image.shape == (3, bh, bw) and item.original_size == (h, w)
    assert data.bucket(data.items.index(next(it for it in data.items if it[0].stem == "32"))) == (64, 64)  # square
    # one shape per batch, and every image in exactly the one bucket of its rows
    batches = BucketBatches(data.buckets, 4, seed=0)
    for epoch in range(2):
        seen = [row for batch in batches.epoch(epoch) for row in batch]
        assert set(seen) == set(range(len(sizes)))
        for batch in batches.epoch(epoch):
            assert len(batch) == 4 and len({data.bucket(row) for row in batch}) == 1
    assert sorted(row for rows in batches.groups.values() for row in rows) == list(range(len(sizes)))


def test_batches_are_shuffled_per_epoch_and_filled_from_their_own_bucket():
    row_buckets = [(64, 64)] * 9 + [(96, 40)] * 2 + [(40, 96)] * 5
    batches = BucketBatches(row_buckets, 4, seed=3)
    assert batches.per_epoch == 3 + 1 + 2
    first, again = batches.epoch(0), BucketBatches(row_buckets, 4, seed=3).epoch(0)
    assert first == again and first != batches.epoch(1)  # seeded by (seed, epoch)
    wide = next(b for b in first if row_buckets[b[0]] == (96, 40))
    assert sorted(wide) == [9, 9, 10, 10]  # two images fill a batch of four by repeating
    assert [batches.rows(s) for s in range(12)] == first + batches.epoch(1)  # the epochs end to end


def test_no_upscale_gives_each_image_its_own_bucket_never_larger(tmp_path):
    spec = BucketSpec(64, 16, 96, 8, no_upscale=True)
    for w, h in [(40, 24), (96, 48), (200, 30), (70, 70), (17, 90)]:
        bw, bh = own_bucket(w, h, spec)
        assert bw <= w and bh <= h and bw % 8 == 0 and bh % 8 == 0
        assert bw * bh <= 64**2 and max(bw, bh) <= 96
    assert own_bucket(40, 24, spec) == (40, 24)  # small enough already: only rounded down to the steps
    data = ImageCaptionFolder(picture_folder(tmp_path / "d", [(44, 30), (96, 48)]), 64, buckets=spec)
    assert data.buckets == [(40, 24), own_bucket(96, 48, spec)]
    # within the budget: cropped to the bucket, not resampled (kohya's no_upscale)
    assert data.load(0).image.shape == (3, 24, 40) and data.load(0).crop == (3, 2)  # (30-24)//2, (44-40)//2


def test_micro_conditioning_takes_the_true_original_size_and_crop(tmp_path):
    """96×48 in a 64×32 bucket: scaled by 2/3, nothing cropped, original (48, 96) as (height, width). 90×40 in the
    same bucket: scaled by 0.8 to 72×32, 4 px cropped at the left: the crop in the resized image, as generative-
    models records it (kohya's `get_crop_ltrb` would record (1, 0), the image fitted inside the bucket; issue 1443).
    In an SDXL batch they are its micro-conditioning, with the bucket (32, 64) as the target size."""
    spec = BucketSpec(64, 32, 64, 16)
    root = picture_folder(tmp_path / "d", [(96, 48), (90, 40)])
    data = ImageCaptionFolder(root, 64, buckets=spec)
    a, b = data.load(0), data.load(1)
    assert data.buckets == [(64, 32), (64, 32)]
    assert (a.original_size, a.crop, a.image.shape) == ((48, 96), (0, 0), (3, 32, 64))
    assert (b.original_size, b.crop) == ((40, 90), (0, 4))

    model = tiny_model("sdxl", seed=5)
    cfg = TrainConfig(outdir=str(tmp_path / "run"), data=str(root), prompt_dropout=0.0,
                      enable_bucket=True, min_bucket_reso=32, max_bucket_reso=64, bucket_reso_steps=16,
                      **{**FAST, "batch_size": 2})  # fmt: skip
    seen = []
    real = model.conditioner.vector
    model.conditioner.vector = lambda pooled, micro: seen.append(micro) or real(pooled, micro)
    with torch.no_grad():
        run = Run(cfg, model, data, build_cache(model, data, CPU, cfg, quiet=True), CPU, 0, 1)
        batch = make_batch(run, 0, slice(0, 2))
    assert batch.latents.shape == (2, 4, 4, 8)
    rows = {tuple(r) for r in torch.cat([seen[0]["original_size"], seen[0]["crop_coords"]], 1).tolist()}
    assert rows == {(48.0, 96.0, 0.0, 0.0), (40.0, 90.0, 0.0, 4.0)}
    assert seen[0]["target_size"].tolist() == [[32, 64], [32, 64]]


def test_resume_with_buckets_is_exact(tmp_path, monkeypatch):
    root = picture_folder(tmp_path / "d", THREE_SHAPES)
    common = dict(data=str(root), save_every=2, **BUCKETS, **FAST)
    shapes = []
    real = training_step.diffusion_loss

    def spy(net, batch, *args, **kwargs):
        shapes.append(batch.latents.shape)
        return real(net, batch, *args, **kwargs)

    monkeypatch.setattr(training_step, "diffusion_loss", spy)
    train(TrainConfig(outdir=str(tmp_path / "straight"), steps=4, **common))
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=2, **common))
    train(TrainConfig(outdir=str(tmp_path / "resumed"), steps=4, resume=True, **common))
    a = load_model(tmp_path / "straight" / "model.safetensors").state_dict()
    b = load_model(tmp_path / "resumed" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert shapes[:4] == shapes[4:] and len(set(shapes)) > 1  # the same batches again, of several buckets


def test_without_the_cache_the_batches_are_the_same(tmp_path):
    root = picture_folder(tmp_path / "d", THREE_SHAPES)
    model = tiny_model("sd1", seed=2)
    cfg = TrainConfig(outdir=str(tmp_path / "run"), data=str(root), **BUCKETS, **FAST)
    data = ImageCaptionFolder(root, 64, buckets=bucket_spec(cfg))
    with torch.no_grad():
        cached = Run(cfg, model, data, build_cache(model, data, CPU, cfg, quiet=True), CPU, 0, 1)
        uncached = Run(TrainConfig(**{**cfg.__dict__, "cache_latents": False}), model, data, None, CPU, 0, 1)
        for s in range(6):
            a, b = make_batch(cached, s, slice(0, 4)), make_batch(uncached, s, slice(0, 4))
            assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.noise, b.noise)
            torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(a.cond["crossattn"], b.cond["crossattn"], atol=1e-5, rtol=0)


def test_control_images_go_into_their_images_bucket(tmp_path):
    root = picture_folder(tmp_path / "d", [(96, 48), (40, 80), (64, 64), (90, 40)], control=True)
    data = ImageCaptionFolder(root, 64, control=True, buckets=BucketSpec(64, 32, 96, 16))
    for i in range(4):
        item = data.load(i)
        assert item.hint.shape == item.image.shape and torch.allclose(item.hint, (item.image + 1) / 2, atol=1e-6)
        assert torch.equal(data.hint(i), item.hint)
    cfg = ControlNetTrainConfig(outdir=str(tmp_path / "run"), data=str(root), steps=1, **BUCKETS, **FAST)
    assert train_controlnet(cfg).exists()


def test_tag_shuffling_keeps_the_first_tags_and_is_seeded_by_the_step(tmp_path, monkeypatch):
    caption = "sks dog, on grass, sunny, photo, dslr"
    orders = {shuffle_tags(caption, 2, random.Random(s)) for s in range(30)}
    assert len(orders) > 5 and all(o.startswith("sks dog, on grass, ") for o in orders)
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in orders)
    assert shuffle_tags("a,, b ,c", 0, random.Random(1)).count(",") == 2  # empty tags dropped, spaces trimmed

    root = picture_folder(tmp_path / "d", THREE_SHAPES)
    model = tiny_model("sd1", seed=2)
    cfg = TrainConfig(outdir=str(tmp_path / "run"), data=str(root), shuffle_caption=True, keep_tokens=1,
                      prompt_dropout=0.0, **BUCKETS, **FAST)  # fmt: skip
    data = ImageCaptionFolder(root, 64, buckets=bucket_spec(cfg))
    seen = []
    real = training_step.text_conditioning
    monkeypatch.setattr(training_step, "text_conditioning", lambda run, c: seen.append(c) or real(run, c))
    with torch.no_grad():
        run = Run(cfg, model, data, build_cache(model, data, CPU, cfg, quiet=True), CPU, 0, 1)
        steps = [make_batch(run, s, slice(0, 4)) for s in (0, 1, 0)]
        make_batch(run, 1, slice(0, 2)), make_batch(run, 1, slice(2, 4))  # two processes' halves
    whole, first, again, half, other_half = seen
    assert whole == again and torch.equal(steps[0].cond["crossattn"], steps[2].cond["crossattn"])
    assert half + other_half == first  # each process shuffles its slice as one process would
    assert all(c.startswith("picture ") for c in whole + first)
    assert len({c.split(", ", 1)[1] for c in whole + first}) > 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--enable-bucket", "--min-bucket-reso", "96", "--max-bucket-reso", "64"],
         "min-bucket-reso 96 is above max-bucket-reso 64"),
        (["--enable-bucket", "--bucket-reso-steps", "12"], "bucket-reso-steps must be a positive multiple of 8, not 12"),
        (["--enable-bucket", "--bucket-reso-steps", "0"], "bucket-reso-steps must be a positive multiple of 8, not 0"),
        (["--enable-bucket", "--min-bucket-reso", "128", "--max-bucket-reso", "256"],
         "image-size 64 must lie between min-bucket-reso 128 and max-bucket-reso 256"),
        (["--enable-bucket", "--min-bucket-reso", "40"], "min-bucket-reso must be a positive multiple of bucket-reso"),
        (["--bucket-no-upscale"], "--bucket-no-upscale needs --enable-bucket"),
        (["--keep-tokens", "2"], "--keep-tokens needs --shuffle-caption"),
        (["--enable-bucket", "--bucket-no-upscale", "--data", "{d}"], "20x20 px is smaller than the smallest bucket"),
    ],
)  # fmt: skip
def test_bad_bucket_input_exits_2(tmp_path, capsys, args, message):
    picture_folder(tmp_path / "d", [(64, 64), (20, 20)])
    argv = ["train", "--outdir", str(tmp_path / "run"), "--steps", "1", "--quiet", "--image-size", "64",
            "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "16"]  # fmt: skip
    if "--enable-bucket" not in args:
        argv = argv[:8]  # the bucket flags alone would be refused without --enable-bucket
    assert main(argv + [a.replace("{d}", str(tmp_path / "d")) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_caption_files_of_kohyas_extension(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (32, 16)).save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.caption").write_text("from a caption file\n")
    assert ImageCaptionFolder(tmp_path / "d", 16).load(0).caption == "from a caption file"
