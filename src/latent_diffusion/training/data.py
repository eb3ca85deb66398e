"""Training data: captioned image folders in the two usual forms, and a synthetic captioned shapes set.

Folder forms: `name.jpg` + `name.txt` (or kohya's `name.caption`) side by side, or a `metadata.jsonl` with
{"file_name", "text"} per line. Images are resized (shorter side) and center-cropped to the training size, or, with
aspect-ratio buckets (`buckets.py`), resized to cover their bucket and center-cropped to it; unreadable images are
skipped and counted, never a crash mid-epoch. Items are `Item`s: the image (3, H, W) in [-1, 1], its caption, and
the original size and crop that SDXL's micro-conditioning takes.

ControlNet training (`controlnet.py`) also takes each image's control image ("hint"), in [0, 1] as the ControlNet
sees it: in a folder, from a `metadata.jsonl` whose lines also name a "conditioning_image" (a path relative to the
folder, as the column of diffusers' `train_controlnet.py`), resized and center-cropped as its image, into its
image's bucket; in the shapes set, the shape's filled mask, white on black (`draw(..., mask=True)`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageOps, UnidentifiedImageError

from .buckets import BucketSpec, bucket_for, bucket_resolutions, cover_and_crop

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CAPTION_SUFFIXES = (".txt", ".caption")  # the first that exists; `.caption` is kohya's default extension
READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError)


class DataError(ValueError):
    """A data set that cannot be used as given; the message says why."""


class Item(NamedTuple):
    image: torch.Tensor  # (3, H, W) in [-1, 1]: the training size S × S, or the image's bucket
    caption: str
    original_size: tuple[int, int]  # (height, width) of the image as read, before resizing
    crop: tuple[int, int]  # (top, left) of the crop in the resized image: generative-models' crop_coords_top_left
    hint: torch.Tensor | None = None  # (3, H, W) in [0, 1]: the control image, for ControlNet training


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def to_hint(im: Image.Image) -> torch.Tensor:
    """A control image as a ControlNet takes it: (3, S, S) in [0, 1], 8-bit values / 255 as generation's maps."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def resize_center_crop(
    im: Image.Image, bucket: tuple[int, int], spec: BucketSpec | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """-> (the image resized to cover the bucket (width, height) and center-cropped to it, the crop's (top, left)
    in the resized image); `buckets.cover_and_crop`."""
    (w, h), (top, left) = cover_and_crop(im.width, im.height, bucket, spec)
    if (w, h) != im.size:
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    return im.crop((left, top, left + bucket[0], top + bucket[1])), (top, left)


def oriented_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of the image as it is shown (EXIF orientations 5-8 turn it by 90°), read from its header
    alone; None if it cannot be read."""
    try:
        with Image.open(path) as im:
            turned = im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
            return (im.height, im.width) if turned else im.size
    except READ_ERRORS:
        return None


def caption_file(image: Path) -> Path | None:
    return next((p for p in map(image.with_suffix, CAPTION_SUFFIXES) if p.exists()), None)


def read_text(path: Path) -> str:
    """A caption or metadata file as text; DataError naming the file if it is no readable UTF-8 file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Kohya's --shuffle_caption: the caption's comma-separated tags, the first `keep_tokens` in place and the rest
    in a random order, joined by ", " (empty tags dropped)."""
    tags = [t for t in (t.strip() for t in caption.split(",")) if t]
    kept, shuffled = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(shuffled)
    return ", ".join(kept + shuffled)


class ImageCaptionFolder(torch.utils.data.Dataset):
    """A folder of captioned images (module docstring); control: each with its control image, read from the
    metadata.jsonl's "conditioning_image" column (DataError where the folder has none, or where one is missing);
    buckets: each image in its aspect-ratio bucket (`buckets.py`), else all in the size × size square."""

    def __init__(
        self,
        root: str | Path,
        size: int,
        *,
        flip: bool = False,
        caption_default: str | None = None,
        control: bool = False,
        buckets: BucketSpec | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such data folder")
        self.size, self.flip, self.spec = size, flip, buckets
        if (root / "metadata.jsonl").exists():
            self.items = self._read_metadata(root, control)
        elif control:
            raise DataError(
                f"{root}: ControlNet training reads a metadata.jsonl with file_name, conditioning_image and text "
                "on each line; this folder has none"
            )
        else:
            self.items = []
            missing = []
            for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                if captions := caption_file(path):
                    self.items.append((path, read_text(captions).strip(), None))
                elif caption_default is not None:
                    self.items.append((path, caption_default, None))
                else:
                    missing.append(path.name)
            if missing:
                raise DataError(
                    f"{root}: {len(missing)} images have no caption file (first: {missing[0]}); add NAME.txt "
                    "(or NAME.caption) files, a metadata.jsonl, or pass --caption-default"
                )
        if not self.items:
            raise DataError(f"{root}: no images (.jpg, .png, .webp, .bmp) found")
        if control and (missing := [c for _, _, c in self.items if not c.is_file()]):
            raise DataError(
                f"{root}: {len(missing)} conditioning images are missing (first: {missing[0].relative_to(root)})"
            )
        self.skipped = 0
        self.buckets = [(size, size)] * len(self.items) if buckets is None else self._place(buckets)

    def _place(self, spec: BucketSpec) -> list[tuple[int, int]]:
        """Each image's bucket, from its header; images whose header cannot be read are left out (and counted as
        skipped), an image too small for any bucket under no_upscale is a DataError."""
        resolutions = bucket_resolutions(spec)
        kept, placed = [], []
        for item in self.items:
            size = oriented_size(item[0])
            if size is None:
                self.skipped += 1
                continue
            bucket = bucket_for(*size, spec, resolutions)
            if bucket is None:
                raise DataError(
                    f"{item[0]}: {size[0]}x{size[1]} px is smaller than the smallest bucket "
                    f"({spec.min_reso} px a side) and --bucket-no-upscale never enlarges it"
                )
            kept.append(item)
            placed.append(bucket)
        if not kept:
            raise DataError(f"{self.items[0][0].parent}: none of the {len(self.items)} images can be read")
        self.items = kept
        return placed

    def bucket(self, index: int) -> tuple[int, int]:
        """Item index's (width, height) in pixels: its image's shape in training."""
        return self.buckets[index]

    @staticmethod
    def _read_metadata(root: Path, control: bool) -> list[tuple[Path, str, Path | None]]:
        items = []
        needs = "file_name, conditioning_image and text" if control else "file_name and text"
        for n, line in enumerate(read_text(root / "metadata.jsonl").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                hint = root / record["conditioning_image"] if control else None
                items.append((root / record["file_name"], str(record["text"]), hint))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{root / 'metadata.jsonl'}:{n}: needs {needs} ({type(e).__name__}: {e})") from None
        return items

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, path: Path, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int], tuple[int, int]] | None:
        """(the image resized and center-cropped into the bucket, its original (height, width), the crop's (top,
        left)), or None if it cannot be read."""
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                original = (im.height, im.width)
                im, crop = resize_center_crop(im, bucket, self.spec)
        except READ_ERRORS:
            return None
        return im, original, crop

    def load(self, index: int, rng: random.Random | None = None) -> Item | None:
        """The item, or None (and one more in `skipped`) if its image or its control image cannot be read. A flip
        turns both."""
        path, caption, hint_path = self.items[index]
        bucket = self.buckets[index]
        read, hint = self._read(path, bucket), hint_path and self._read(hint_path, bucket)
        if read is None or (hint_path and hint is None):
            self.skipped += 1
            return None
        im, original, crop = read
        pictures = [im, hint[0]] if hint else [im]
        if self.flip and rng is not None and rng.random() < 0.5:
            pictures = [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in pictures]
        return Item(to_tensor(pictures[0]), caption, original, crop, to_hint(pictures[1]) if hint else None)

    def caption(self, index: int) -> str:
        return self.items[index][1]

    def cache_key(self, index: int) -> str | None:
        """What item index's image in training depends on (its file: path, size, modification time; its bucket and
        the resize rule), for the latent cache on disk; None if the file is gone."""
        path = self.items[index][0]
        try:
            st = path.stat()
        except OSError:
            return None
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.buckets[index]}|{self.spec}"

    def hint(self, index: int) -> torch.Tensor | None:
        """Item index's control image alone (unflipped), or None if it cannot be read."""
        read = self._read(self.items[index][2], self.buckets[index])
        return None if read is None else to_hint(read[0])

    def __getitem__(self, index: int):
        return self.load(index)


# The synthetic shapes set -------------------------------------------------------------------------------------

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.55}  # side as a fraction of the image
# Colour–shape pairs that the built-in model never sees in a caption: they measure composition.
HELD_OUT_PAIRS = frozenset({("green", "triangle"), ("purple", "circle"), ("white", "square")})
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "center": (0.5, 0.5)}
# Places the built-in model never saw a shape at: its LoRA teaches them (`assets/shapes-corners.safetensors`)
CORNERS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
PLACES = POSITIONS | CORNERS  # (x, y) of the shape's centre, as fractions of the image


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    background: str
    size: str
    position: str

    @property
    def where(self) -> str:
        return "in the center" if self.position == "center" else f"at the {self.position}"

    @property
    def caption(self) -> str:
        """The template caption, every attribute named: "a small red circle at the left on a blue background"."""
        background = f"{an(self.background)} {self.background} background"
        return f"a {self.size} {self.color} {self.shape} {self.where} on {background}"


def an(word: str) -> str:
    """The indefinite article before `word`: "an orange", "a small"."""
    return "an" if word[0] in "aeiou" else "a"


class PromptForm(NamedTuple):
    write: Callable[[Shape], str]
    attributes: tuple[str, ...]  # what the prompt names; only these are scored


# The fixed prompt forms `ldm eval` scores (listed in BENCHMARKS.md). Apart from the template, no training caption
# is ever one of these exact strings: the model has to understand them, not remember them.
EVAL_FORMS = {
    "template": PromptForm(lambda s: s.caption, ("shape", "color", "background", "size", "position")),
    "short": PromptForm(lambda s: f"{an(s.color)} {s.color} {s.shape}", ("shape", "color")),
    "sized": PromptForm(lambda s: f"a {s.size} {s.color} {s.shape}", ("shape", "color", "size")),
    "on background": PromptForm(
        lambda s: f"{an(s.color)} {s.color} {s.shape} on {an(s.background)} {s.background} background",
        ("shape", "color", "background"),
    ),
    "tags": PromptForm(lambda s: f"{s.color} {s.shape}, {s.background} background", ("shape", "color", "background")),
    "background first": PromptForm(
        lambda s: f"{an(s.background)} {s.background} background with a {s.size} {s.color} {s.shape} {s.where}",
        ("shape", "color", "background", "size", "position"),
    ),
}

# Training captions vary in wording: the pieces each form is made of, in their alternatives.
WHERE = {
    "left": ("at the left", "on the left", "in the left part", "to the left"),
    "right": ("at the right", "on the right", "in the right part", "to the right"),
    "top": ("at the top", "near the top", "in the top part", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the bottom part", "in the lower part"),
    "center": ("in the center", "in the middle", "in the centre", "centered"),
    **{
        c: (
            f"at the {c}",
            f"in the {c} corner",
            f"in the {c.replace('top', 'upper').replace('bottom', 'lower')} corner",
            f"to the {c}",
        )
        for c in CORNERS
    },
}
SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
ON_BACKGROUND = (
    "on {a} {b} background",
    "on {b}",
    "against {a} {b} background",
    "in front of {a} {b} background",
    "on {a} {b} backdrop",
)
BACKGROUND_FIRST = ("{} background with {}", "{} image with {}", "{} picture showing {}")
TEMPLATE_SHARE = 0.1
PICTURE_OF = ("an image of", "a picture of", "a drawing of", "a photo of")


def training_caption(s: Shape, rng: random.Random, where_share: float = 0.9) -> str:
    """One caption of `s` in a random wording. A tenth are the template. The others always name the colour and
    the shape, size and background each with probability 1/2, and position with `where_share` (9/10: named half
    the time, it was learnt in some runs and not in others; named every time, a prompt without one put every shape
    at the top; a ControlNet's data, 1/2: there the control image says where), in one of several forms: prose ("a red circle on blue"), tags ("red circle, small, left, blue
    background"), background first ("a blue image with a small red circle"), "a picture of ...", "a circle in
    red", "a red-colored circle". What a caption leaves out is drawn at random in the image all the same, so a
    missing word means "any"."""
    if rng.random() < TEMPLATE_SHARE:
        return s.caption
    blocked = {form.write(s) for name, form in EVAL_FORMS.items() if name != "template"}
    while True:
        size = rng.choice(SIZE_WORDS[s.size]) if rng.random() < 0.5 else None
        where = rng.choice(WHERE[s.position]) if rng.random() < where_share else None
        background = s.background if rng.random() < 0.5 else None
        caption = _wording(s, size, where, background, rng)
        if caption not in blocked:
            return caption


def _wording(s: Shape, size: str | None, where: str | None, background: str | None, rng: random.Random) -> str:
    form = rng.randrange(5)
    if form == 1:  # tags, in any order after the object
        # "in the left part" -> "left"; a corner's tag is its name, "top left"
        place = where and (s.position if s.position in CORNERS else where.removesuffix(" part").split()[-1])
        tags = [t for t in (size, place, background and f"{background} background") if t]
        rng.shuffle(tags)
        head = f"{s.color} {s.shape}" if rng.random() < 0.5 else f"{an(s.color)} {s.color} {s.shape}"
        return ", ".join([head, *tags])
    if form == 3:  # "a circle in red", "a red-colored circle"
        if rng.random() < 0.5:
            thing = f"{s.shape} in {s.color}"
        else:
            thing = f"{s.color}-{rng.choice(('colored', 'coloured'))} {s.shape}"
    else:
        thing = f"{s.color} {s.shape}"
    thing = f"{size} {thing}" if size else thing
    thing = f"{an(thing)} {thing}"
    if form == 2 and background:  # background first
        thing = rng.choice(BACKGROUND_FIRST).format(background, thing + (f" {where}" if where else ""))
        return f"{an(background)} {thing}"
    parts = [thing, where, background and rng.choice(ON_BACKGROUND).format(a=an(background), b=background)]
    if where and background and rng.random() < 0.3:  # "a red circle on blue at the left"
        parts[1], parts[2] = parts[2], parts[1]
    caption = " ".join(p for p in parts if p)
    return f"{rng.choice(PICTURE_OF)} {caption}" if form == 4 else caption


def draw(spec: Shape, image_size: int, mask: bool = False) -> Image.Image:
    """The shape in its colour on its background; mask: the same shape white on black, its control image. The
    filled mask rather than an edge map: at the latent's 1/8 scale a 1-pixel outline of a small shape is a few faint
    values, the filled mask says where and how large in every pixel it covers."""
    fill, background = ((255, 255, 255), (0, 0, 0)) if mask else (COLORS[spec.color], COLORS[spec.background])
    im = Image.new("RGB", (image_size, image_size), background)
    d = ImageDraw.Draw(im)
    side = SIZES[spec.size] * image_size
    cx, cy = (p * image_size for p in PLACES[spec.position])
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if spec.shape == "circle":
        d.ellipse(box, fill=fill)
    elif spec.shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return im


class ShapesDataset(torch.utils.data.Dataset):
    """`count` images of one coloured shape on a coloured background, with their captions; deterministic
    in `seed`. `exclude`: (colour, shape) pairs never drawn (held out to test composition)."""

    def __init__(
        self,
        count: int,
        image_size: int = 64,
        seed: int = 0,
        exclude=HELD_OUT_PAIRS,
        only=None,
        control=False,
        positions: tuple[str, ...] = tuple(POSITIONS),
    ):
        """only: draw nothing but these (colour, shape) pairs (for evaluating the held-out ones); positions: the places
        drawn at (`PLACES`), each equally often (name one twice to draw it twice as often); control: items with
        the shape's mask as their control image, and captions that name the position half the time, not nine times
        in ten (with 9/10, a ControlNet trained for 1000 steps put the shape where its mask is in 60-66 % of the
        images of prompts that name no position, which the base model draws in the center: it had seldom seen
        such a prompt)."""
        rng = random.Random(seed)
        self.image_size, self.specs, self.control = image_size, [], control
        while len(self.specs) < count:
            color, background = rng.sample(list(COLORS), 2)
            spec = Shape(rng.choice(SHAPES), color, background, rng.choice(list(SIZES)), rng.choice(positions))
            pair = (spec.color, spec.shape)
            if (only is None and pair not in exclude) or (only is not None and pair in only):
                self.specs.append(spec)
        # The wordings come from a second generator, so that the images of a seed do not depend on them.
        words = random.Random(f"captions {seed}")
        self.captions = [training_caption(s, words, 0.5 if control else 0.9) for s in self.specs]
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.specs)

    def load(self, index: int, rng: random.Random | None = None) -> Item:
        spec, size = self.specs[index], self.image_size
        hint = self.hint(index) if self.control else None
        return Item(to_tensor(draw(spec, size)), self.captions[index], (size, size), (0, 0), hint)

    def bucket(self, index: int) -> tuple[int, int]:
        """Every shape is drawn in the image_size square: with buckets on, it is the square bucket."""
        return (self.image_size, self.image_size)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def cache_key(self, index: int) -> str:
        """What item index's image depends on: its drawing (`ImageCaptionFolder.cache_key`)."""
        return f"shapes|{self.specs[index]}|{self.image_size}"

    def hint(self, index: int) -> torch.Tensor:
        """Item index's control image: its shape's mask (3, S, S), 1 inside, 0 outside."""
        return to_hint(draw(self.specs[index], self.image_size, mask=True))

    def __getitem__(self, index: int):
        return self.load(index)
