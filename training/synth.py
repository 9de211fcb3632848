"""Synthetic pedestrians in the Market-1501 layout, rendered with numpy and Pillow.

No dataset can be downloaded here, so training and tests run on drawn people. What makes
re-identification hard is imitated on purpose (see docs/synthetic-data.md):
- identity: clothing colours and patterns, sleeves, trousers/shorts/skirt, shoes, hair,
  hat, body height and build, carried bag/backpack and its side. Identities come in small
  groups that share one clothing palette, so colour alone does not tell them apart;
- camera: illumination colour cast, level and gamma, background, blur, noise, JPEG
  quality, and the usual viewpoint (a backpack is seen from the back, a chest logo from
  the front, a shoulder bag from its side);
- image: walking pose, scale, shift, partial occlusion by an object or another person.

Everything is drawn from random generators seeded by (seed, what is drawn), so the same
arguments give the same bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from models.progress import progress as progress_bar

CROP_HEIGHT, CROP_WIDTH = 128, 64
SPLITS = ("bounding_box_train", "bounding_box_test", "query")

# Drawn at twice the crop size, then reduced: cheap anti-aliasing.
_H, _W = 2 * CROP_HEIGHT, 2 * CROP_WIDTH

# Clothing colours (RGB). Identities of one palette group draw from the same few entries.
_COLOURS = np.array(
    [
        (20, 20, 22), (235, 235, 230), (128, 128, 130), (60, 60, 64), (28, 38, 90),
        (40, 80, 170), (120, 160, 210), (170, 25, 30), (100, 20, 30), (35, 110, 50),
        (100, 110, 50), (190, 170, 130), (110, 70, 40), (220, 190, 40), (220, 130, 160),
        (100, 50, 130), (230, 110, 30), (40, 140, 140),
    ],
    dtype=np.float64,
)
_SKIN = np.array([(245, 205, 175), (225, 180, 140), (190, 140, 100), (140, 95, 65), (95, 65, 45)], dtype=np.float64)
_HAIR = np.array([(15, 12, 10), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 150, 150), (140, 60, 30)], dtype=np.float64)
_UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "checks", "logo", "jacket", "block", "sleeves")
_LOWER_STYLES = ("trousers", "trousers", "trousers", "shorts", "skirt")
_BAGS = ("none", "none", "backpack", "shoulder", "handbag")
_VIEWS = ("front", "back", "left", "right")


@dataclass(frozen=True)
class Identity:
    """Everything that stays the same for one person across cameras."""

    height: float  # fraction of the crop height at scale 1
    build: float  # width multiplier
    skin: tuple
    hair: tuple
    hair_length: str  # short | medium | long
    hat: tuple | None
    upper: tuple
    upper_second: tuple
    upper_pattern: str
    pattern_period: float  # stripe/check period as a fraction of body height
    long_sleeves: bool
    lower: tuple
    lower_style: str
    side_stripe: tuple | None
    shoes: tuple
    bag: str
    bag_colour: tuple
    bag_side: int  # +1: the person's right, -1: left


@dataclass(frozen=True)
class Camera:
    """One camera's look: light, lens, background and the way people usually pass it."""

    gain: np.ndarray  # per-channel colour cast
    brightness: float
    gamma: float
    blur: float
    noise: float
    jpeg_quality: int
    view_weights: np.ndarray  # probabilities of front/back/left/right
    scale: float
    background: Image.Image  # wider and taller than a crop; each image cuts a piece


@dataclass(frozen=True)
class _Shot:
    """One image to write: who (None for a distractor), where and under which name."""

    split: str
    pid: int
    camera: int
    sequence: int
    frame: int
    box: int
    view: str
    phase: float
    kind: str  # person | distractor | junk


def generate_dataset(
    out_dir: str | Path,
    identities: int = 200,
    cameras: int = 6,
    seed: int = 0,
    progress: bool = True,
    images_per_camera: tuple[int, int] = (2, 5),
    palette_group: int = 4,
    distractor_fraction: float = 0.15,
    junk_fraction: float = 0.03,
    overwrite: bool = False,
) -> dict:
    """Render a Market-1501-layout dataset into out_dir and return its counts.

    identities: total persons, split in half (train gets the extra one when odd), with
    disjoint ids. Each person visits 2..cameras cameras (at least 2) and is seen in
    images_per_camera frames on each. For a test person one frame per visited camera goes
    to query/, the rest to bounding_box_test/, so each query has a match on another
    camera. The gallery also gets distractors (pid 0000: background and badly cropped
    strangers, distractor_fraction of the gallery) and junk (pid -1, junk_fraction).
    palette_group persons share one clothing palette. Refuses a non-empty split folder
    unless overwrite=True (which removes the .jpg files in the three split folders only).

    Returns {"train_images", "query_images", "gallery_images" (all of bounding_box_test,
    distractors and junk included), "train_identities", "test_identities",
    "distractor_images", "junk_images", "cameras", "seed"}.
    """
    if identities < 2:
        raise ValueError(f"need at least 2 identities (one train, one test), got {identities}")
    if cameras < 2 or cameras > 9:
        raise ValueError(f"cameras must be between 2 and 9 (one digit in the file name), got {cameras}")
    if identities > 9999:
        raise ValueError(f"at most 9999 identities fit the 4-digit person id, got {identities}")
    low, high = images_per_camera
    if not 2 <= low <= high:
        raise ValueError(f"images_per_camera must be (low, high) with 2 <= low <= high, got {images_per_camera}")

    out = Path(out_dir)
    _prepare_folders(out, overwrite)
    cams = [_make_camera(np.random.default_rng([seed, 2, c])) for c in range(1, cameras + 1)]
    people = _make_identities(identities, seed, palette_group)
    shots = _plan_shots(people, cams, seed, images_per_camera, distractor_fraction, junk_fraction)

    for shot in progress_bar(shots, desc="rendering", unit="img", enabled=progress):
        rng = np.random.default_rng([seed, 4, shot.pid + 1, shot.camera, shot.frame, shot.box])
        camera = cams[shot.camera - 1]
        if shot.kind == "person":
            image = _render_person_crop(people[shot.pid][1], camera, shot, rng)
        elif shot.kind == "distractor":
            image = _render_distractor(camera, shot, rng)
        else:
            image = _render_junk(camera, rng)
        data = _finish(image, camera, rng)
        (out / shot.split / _file_name(shot)).write_bytes(data)

    train_ids = {s.pid for s in shots if s.split == "bounding_box_train"}
    test_ids = {s.pid for s in shots if s.split == "query"}
    return {
        "train_images": sum(s.split == "bounding_box_train" for s in shots),
        "query_images": sum(s.split == "query" for s in shots),
        "gallery_images": sum(s.split == "bounding_box_test" for s in shots),
        "train_identities": len(train_ids),
        "test_identities": len(test_ids),
        "distractor_images": sum(s.kind == "distractor" for s in shots),
        "junk_images": sum(s.kind == "junk" for s in shots),
        "cameras": cameras,
        "seed": seed,
    }


def _prepare_folders(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    for split in SPLITS:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        old = sorted(folder.glob("*.jpg"))
        if old and not overwrite:
            raise FileExistsError(f"{folder} already holds {len(old)} images; choose an empty folder")
        for path in old:
            path.unlink()


def _file_name(shot: _Shot) -> str:
    pid = "-1" if shot.pid < 0 else f"{shot.pid:04d}"
    return f"{pid}_c{shot.camera}s{shot.sequence}_{shot.frame:06d}_{shot.box:02d}.jpg"


# ----------------------------------------------------------------------------- planning


def _make_identities(count: int, seed: int, palette_group: int) -> dict[int, tuple[str, Identity]]:
    """pid -> (split, Identity). Palette groups never straddle the train/test split."""
    rng = np.random.default_rng([seed, 0])
    pids = np.arange(1, count + 1)
    shuffled = rng.permutation(pids)
    train = sorted(int(p) for p in shuffled[: (count + 1) // 2])
    test = sorted(int(p) for p in shuffled[(count + 1) // 2 :])
    people = {}
    for split, members in (("bounding_box_train", train), ("bounding_box_test", test)):
        for index, pid in enumerate(members):
            group = index // max(1, palette_group)
            palette = _palette(np.random.default_rng([seed, 3, split == "bounding_box_test", group]))
            people[pid] = (split, _make_identity(np.random.default_rng([seed, 1, pid]), palette))
    return people


def _palette(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper, second and lower colour shared by a palette group."""
    upper, second, lower = rng.choice(len(_COLOURS), size=3, replace=False)
    return _COLOURS[upper], _COLOURS[second], _COLOURS[lower]


def _jitter(rng, colour, amount=12.0) -> tuple:
    return tuple(int(v) for v in np.clip(colour + rng.normal(0, amount, 3), 0, 255))


def _make_identity(rng, palette) -> Identity:
    upper, second, lower = palette
    if rng.random() < 0.25:  # some persons swap which colour is the main one
        upper, second = second, upper
    hat = _jitter(rng, _COLOURS[rng.integers(len(_COLOURS))]) if rng.random() < 0.12 else None
    stripe = _jitter(rng, _COLOURS[rng.integers(len(_COLOURS))]) if rng.random() < 0.2 else None
    shoes = _COLOURS[rng.choice([0, 1, 3, 12, int(rng.integers(len(_COLOURS)))])]
    return Identity(
        height=float(rng.uniform(0.86, 0.98)),
        build=float(rng.uniform(0.85, 1.2)),
        skin=_jitter(rng, _SKIN[rng.integers(len(_SKIN))], 8),
        hair=_jitter(rng, _HAIR[rng.integers(len(_HAIR))], 8),
        hair_length=str(rng.choice(["short", "short", "medium", "long"])),
        hat=hat,
        upper=_jitter(rng, upper),
        upper_second=_jitter(rng, second),
        upper_pattern=str(rng.choice(_UPPER_PATTERNS)),
        pattern_period=float(rng.uniform(0.035, 0.09)),
        long_sleeves=bool(rng.random() < 0.6),
        lower=_jitter(rng, lower),
        lower_style=str(rng.choice(_LOWER_STYLES)),
        side_stripe=stripe,
        shoes=_jitter(rng, shoes, 10),
        bag=str(rng.choice(_BAGS)),
        bag_colour=_jitter(rng, _COLOURS[rng.integers(len(_COLOURS))]),
        bag_side=int(rng.choice([-1, 1])),
    )


def _plan_shots(people, cams: list[Camera], seed, images_per_camera, distractor_fraction, junk_fraction) -> list[_Shot]:
    """Who is seen where, in which frames and views, and which split each image goes to."""
    rng = np.random.default_rng([seed, 5])
    cameras = len(cams)
    next_frame = {c: int(rng.integers(100, 2000)) for c in range(1, cameras + 1)}
    shots = []

    def frame(camera):
        next_frame[camera] += int(rng.integers(5, 60))
        return next_frame[camera]

    for pid in sorted(people):
        split, _ = people[pid]
        n_cams = int(min(cameras, 2 + rng.binomial(cameras - 2, 0.35)))
        visited = sorted(int(c) for c in rng.choice(np.arange(1, cameras + 1), size=n_cams, replace=False))
        for camera in visited:
            n_frames = int(rng.integers(images_per_camera[0], images_per_camera[1] + 1))
            sequence = int(rng.integers(1, 7))
            view = str(rng.choice(_VIEWS, p=cams[camera - 1].view_weights))
            phase = rng.uniform(0, 2 * math.pi)
            query_index = int(rng.integers(n_frames)) if split == "bounding_box_test" else -1
            start = frame(camera)
            for i in range(n_frames):
                this_view = view if rng.random() > 0.15 else str(rng.choice(_VIEWS))
                target = "query" if i == query_index else split
                shots.append(_Shot(target, pid, camera, sequence, start + 6 * i, 1, this_view, phase + 0.9 * i, "person"))

    gallery = sum(s.split == "bounding_box_test" for s in shots)
    for kind, pid, fraction in (("distractor", 0, distractor_fraction), ("junk", -1, junk_fraction)):
        for _ in range(int(round(gallery * fraction))):
            camera = int(rng.integers(1, cameras + 1))
            shots.append(
                _Shot("bounding_box_test", pid, camera, int(rng.integers(1, 7)), frame(camera),
                      int(rng.integers(1, 4)), str(rng.choice(_VIEWS)), rng.uniform(0, 2 * math.pi), kind)
            )
    return shots


def _make_camera(rng) -> Camera:
    return Camera(
        gain=np.exp(rng.normal(0.0, 0.09, 3)),
        brightness=float(rng.uniform(0.7, 1.2)),
        gamma=float(rng.uniform(0.85, 1.2)),
        blur=float(rng.uniform(0.0, 0.9)),
        noise=float(rng.uniform(2.0, 9.0)),
        jpeg_quality=int(rng.integers(45, 92)),
        view_weights=rng.dirichlet(np.full(4, 0.7)),
        scale=float(rng.uniform(0.88, 1.0)),
        background=_make_background(rng),
    )


def _make_background(rng) -> Image.Image:
    """A scene larger than a crop: wall over floor, a texture, a few fixed objects."""
    height, width = _H + 64, _W + 96
    wall = _COLOURS[rng.integers(len(_COLOURS))] * 0.3 + rng.uniform(60, 170) * 0.7
    floor = np.full(3, rng.uniform(70, 170)) + rng.normal(0, 15, 3)
    horizon = int(rng.uniform(0.45, 0.75) * height)
    # Smooth low-frequency variation: small random field, upscaled.
    field = rng.normal(0, 1, (6, 5, 3))
    smooth = np.asarray(Image.fromarray(((field - field.min()) / np.ptp(field) * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR), dtype=np.float64)
    pixels = np.empty((height, width, 3))
    pixels[:horizon] = wall
    pixels[horizon:] = floor
    pixels += (smooth - 128) * rng.uniform(0.1, 0.35)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    line = tuple(int(v) for v in np.clip(wall * rng.uniform(0.6, 1.3), 0, 255))
    texture = rng.choice(["bricks", "panels", "plain", "tiles"])
    if texture == "bricks":
        step = int(rng.integers(10, 20))
        for row, y in enumerate(range(0, horizon, step)):
            draw.line([(0, y), (width, y)], fill=line, width=2)
            for x in range((row % 2) * step, width, 2 * step):
                draw.line([(x, y), (x, y + step)], fill=line, width=2)
    elif texture == "panels":
        step = int(rng.integers(25, 60))
        for x in range(int(rng.integers(0, step)), width, step):
            draw.rectangle([x, 0, x + step // 3, horizon], fill=line)
    elif texture == "tiles":
        step = int(rng.integers(14, 30))
        for x in range(0, width, step):
            draw.line([(x, horizon), (x + (x - width / 2) * 0.6, height)], fill=line, width=2)
        for y in range(horizon, height, step // 2):
            draw.line([(0, y), (width, y)], fill=line, width=1)
    for _ in range(int(rng.integers(0, 4))):  # poles, windows, signs
        colour = tuple(int(v) for v in _COLOURS[rng.integers(len(_COLOURS))])
        x = int(rng.integers(0, width))
        if rng.random() < 0.5:
            draw.rectangle([x, 0, x + int(rng.integers(4, 12)), height], fill=colour)
        else:
            y = int(rng.integers(0, horizon))
            draw.rectangle([x, y, x + int(rng.integers(15, 50)), y + int(rng.integers(10, 40))], fill=colour)
    return image


# ----------------------------------------------------------------------------- drawing


def _background_piece(camera: Camera, rng) -> Image.Image:
    bg = camera.background
    x = int(rng.integers(0, bg.width - _W + 1))
    y = int(rng.integers(0, bg.height - _H + 1))
    return bg.crop((x, y, x + _W, y + _H))


def _render_person_crop(person: Identity, camera: Camera, shot: _Shot, rng) -> Image.Image:
    canvas = _background_piece(camera, rng)
    scale = camera.scale * float(rng.uniform(0.88, 1.08))
    height = _H * person.height * scale
    centre_x = _W / 2 + float(np.clip(rng.normal(0, 0.1), -0.22, 0.22)) * _W
    feet_y = _H - (_H - height) / 2 + float(np.clip(rng.normal(0, 0.04), -0.08, 0.08)) * _H
    _draw_person(canvas, person, shot.view, shot.phase, centre_x, feet_y, height)
    if rng.random() < 0.25:
        _occlude(canvas, camera, rng)
    return canvas


def _render_distractor(camera: Camera, shot: _Shot, rng) -> Image.Image:
    """A bad detection: background only, or a stranger cut badly by the box."""
    canvas = _background_piece(camera, rng)
    if rng.random() < 0.35:
        return canvas
    stranger = _make_identity(rng, _palette(rng))
    height = _H * float(rng.uniform(0.6, 1.6))
    centre_x = _W * float(rng.uniform(0.1, 0.9))
    feet_y = _H * float(rng.uniform(0.55, 1.5))
    _draw_person(canvas, stranger, shot.view, shot.phase, centre_x, feet_y, height)
    return canvas


def _render_junk(camera: Camera, rng) -> Image.Image:
    """Useless crops: mostly noise and blur, the kind Market-1501 marks -1."""
    canvas = _background_piece(camera, rng)
    pixels = np.asarray(canvas, dtype=np.float64)
    pixels = pixels * 0.4 + rng.uniform(0, 255, pixels.shape) * 0.6
    return Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(float(rng.uniform(2, 6))))


def _occlude(canvas: Image.Image, camera: Camera, rng) -> None:
    """Cover part of the person: an object at the bottom/side, or a passer-by's body."""
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:
        colour = _jitter(rng, _COLOURS[rng.integers(len(_COLOURS))], 20)
        if rng.random() < 0.6:  # low object: bin, car, railing
            top = int(_H * rng.uniform(0.62, 0.85))
            draw.rectangle([0, top, _W, _H], fill=colour)
        else:  # pillar or someone's shoulder at a side
            width = int(_W * rng.uniform(0.2, 0.38))
            left = 0 if rng.random() < 0.5 else _W - width
            draw.rectangle([left, 0, left + width, _H], fill=colour)
    else:
        passer = _make_identity(rng, _palette(rng))
        side = -1 if rng.random() < 0.5 else 1
        centre_x = _W / 2 + side * _W * rng.uniform(0.55, 0.8)
        height = _H * rng.uniform(0.85, 1.05)
        _draw_person(canvas, passer, str(rng.choice(_VIEWS)), rng.uniform(0, 2 * math.pi), centre_x, _H * rng.uniform(0.92, 1.05), height)


def _draw_person(canvas: Image.Image, p: Identity, view: str, phase: float, cx: float, feet_y: float, h: float) -> None:
    """Draw a walking person whose feet are at (cx, feet_y), h pixels tall, seen from view."""
    draw = ImageDraw.Draw(canvas)
    side = view in ("left", "right")
    facing = 1 if view == "right" else -1  # image x direction a side-view person walks to
    top = feet_y - h
    shoulder_y, hip_y = top + 0.17 * h, top + 0.52 * h
    half_w = (0.1 if side else 0.15) * h * p.build
    hip_half = (0.09 if side else 0.125) * h * p.build
    limb = max(2, int(0.08 * h * p.build))
    swing = math.sin(phase)
    # In a frontal view the person's right is on the image left; from the back it is on the right.
    right_x = {"front": -1, "back": 1, "left": 0, "right": 0}[view]

    # Backpack behind the body in a side view is drawn first.
    if p.bag == "backpack" and side:
        bx = cx - facing * half_w * 1.9
        draw.rectangle([min(bx, cx), shoulder_y + 0.02 * h, max(bx, cx), top + 0.45 * h], fill=p.bag_colour)

    leg_len = feet_y - hip_y
    legs = []
    for sign in (-1, 1):
        if side:
            dx = sign * swing * 0.28 * leg_len * facing
            hip = (cx, hip_y)
            foot = (cx + dx, feet_y - 0.04 * h)
        else:
            hip = (cx + sign * hip_half * 0.5, hip_y)
            foot = (cx + sign * hip_half * 0.6, feet_y - 0.04 * h - max(0.0, sign * swing) * 0.03 * h)
        legs.append((hip, foot))
    arm_len = 0.34 * h
    arms = []
    for sign in (-1, 1):
        if side:
            angle = -sign * swing * 0.45
            shoulder = (cx, shoulder_y + 0.02 * h)
            hand = (shoulder[0] + math.sin(angle) * arm_len * facing, shoulder[1] + math.cos(angle) * arm_len)
        else:
            shoulder = (cx + sign * (half_w - limb * 0.4), shoulder_y + 0.02 * h)
            hand = (shoulder[0] + sign * 0.03 * h, shoulder[1] + arm_len * (1 - 0.05 * abs(swing)))
        arms.append((shoulder, hand))

    # Legs and lower garment.
    for hip, foot in legs:
        knee = ((hip[0] + foot[0]) / 2, (hip[1] + foot[1]) / 2)
        draw.line([hip, foot], fill=p.skin if p.lower_style != "trousers" else p.lower, width=limb + 2)
        if p.lower_style == "shorts":
            draw.line([hip, knee], fill=p.lower, width=limb + 4)
        if p.lower_style == "trousers" and p.side_stripe is not None:
            draw.line([hip, foot], fill=p.side_stripe, width=max(1, limb // 4))
        sx = foot[0] + (facing * 0.035 * h if side else 0)
        draw.ellipse([sx - 0.045 * h, foot[1] - 0.015 * h, sx + 0.045 * h, foot[1] + 0.035 * h], fill=p.shoes)
    if p.lower_style == "skirt":
        skirt_bottom = hip_y + 0.55 * leg_len
        flare = hip_half * 1.5
        draw.polygon([(cx - hip_half, hip_y - 0.02 * h), (cx + hip_half, hip_y - 0.02 * h),
                      (cx + flare, skirt_bottom), (cx - flare, skirt_bottom)], fill=p.lower)
    else:
        draw.rectangle([cx - hip_half, hip_y - 0.02 * h, cx + hip_half, hip_y + 0.06 * h], fill=p.lower)

    # Arm behind the body in a side view.
    sleeve = p.upper_second if p.upper_pattern == "sleeves" else p.upper
    if side:
        _draw_arm(draw, arms[0], p, sleeve, limb)

    # Torso with its pattern, composited through a mask.
    torso = [(cx - half_w, shoulder_y), (cx + half_w, shoulder_y), (cx + hip_half, hip_y + 0.02 * h), (cx - hip_half, hip_y + 0.02 * h)]
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).polygon(torso, fill=255)
    pattern = _pattern(p, view, canvas.size, cx, shoulder_y, hip_y, h)
    canvas.paste(pattern, (0, 0), mask)

    # Straps and carried things in front of the torso.
    if p.bag == "backpack":
        if view == "back":
            draw.rounded_rectangle([cx - half_w * 0.8, shoulder_y + 0.03 * h, cx + half_w * 0.8, top + 0.47 * h], radius=int(0.03 * h), fill=p.bag_colour)
        elif view == "front":
            for sign in (-1, 1):
                x = cx + sign * half_w * 0.55
                draw.line([(x, shoulder_y), (x, shoulder_y + 0.2 * h)], fill=p.bag_colour, width=max(2, limb // 3))
    if p.bag == "shoulder":
        bag_x = cx + (right_x * p.bag_side if not side else 0) * half_w * 1.1
        hidden = side and ((view == "right") != (p.bag_side == 1))
        start = (cx - (right_x * p.bag_side) * half_w * 0.7, shoulder_y)
        if not side:
            draw.line([start, (bag_x, hip_y)], fill=p.bag_colour, width=max(2, limb // 3))
        if not hidden:
            draw.rectangle([bag_x - 0.06 * h, hip_y - 0.05 * h, bag_x + 0.06 * h, hip_y + 0.06 * h], fill=p.bag_colour)

    # Front arm(s) over the torso.
    for arm in (arms[1:] if side else arms):
        _draw_arm(draw, arm, p, sleeve, limb)
    if p.bag == "handbag":
        index = 1 if side else (0 if right_x * p.bag_side < 0 else 1)
        hx, hy = arms[index][1]
        draw.rectangle([hx - 0.04 * h, hy, hx + 0.04 * h, hy + 0.08 * h], fill=p.bag_colour)

    _draw_head(draw, p, view, cx, top, h, facing)


def _draw_arm(draw, arm, p: Identity, sleeve, limb) -> None:
    shoulder, hand = arm
    elbow = ((shoulder[0] + hand[0]) / 2, (shoulder[1] + hand[1]) / 2)
    draw.line([shoulder, hand], fill=sleeve if p.long_sleeves else p.skin, width=limb)
    if not p.long_sleeves:
        draw.line([shoulder, elbow], fill=sleeve, width=limb + 1)
    r = limb * 0.6
    draw.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], fill=p.skin)


def _pattern(p: Identity, view: str, size, cx, shoulder_y, hip_y, h) -> Image.Image:
    """The upper garment as a full-canvas image; the torso mask cuts it out."""
    image = Image.new("RGB", size, p.upper)
    draw = ImageDraw.Draw(image)
    width, height = size
    period = max(4, int(p.pattern_period * h))
    kind = p.upper_pattern
    if kind == "hstripes":
        for y in range(int(shoulder_y), height, period):
            draw.rectangle([0, y, width, y + period // 2], fill=p.upper_second)
    elif kind == "vstripes":
        for x in range(int(cx) % period - period, width, period):
            draw.rectangle([x, 0, x + period // 2, height], fill=p.upper_second)
    elif kind == "checks":
        for y in range(int(shoulder_y), height, period):
            for x in range(int(cx) % (2 * period) - 2 * period, width, 2 * period):
                offset = period if ((y - int(shoulder_y)) // period) % 2 else 0
                draw.rectangle([x + offset, y, x + offset + period - 1, y + period - 1], fill=p.upper_second)
    elif kind == "block":
        # min: a badly cropped stranger's chest can lie below the crop
        draw.rectangle([0, min((shoulder_y + hip_y) / 2, height), width, height], fill=p.upper_second)
    elif kind == "logo" and view == "front":
        r = 0.055 * h
        cy = shoulder_y + 0.12 * h
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=p.upper_second)
    elif kind == "jacket" and view == "front":
        draw.rectangle([cx - 0.04 * h, shoulder_y, cx + 0.04 * h, hip_y + 0.05 * h], fill=p.upper_second)
    elif kind == "jacket" and view in ("left", "right"):
        edge = cx + (0.05 if view == "right" else -0.08) * h
        draw.rectangle([edge, shoulder_y, edge + 0.03 * h, hip_y + 0.05 * h], fill=p.upper_second)
    return image


def _draw_head(draw, p: Identity, view: str, cx, top, h, facing) -> None:
    head_w, head_h = 0.055 * h, 0.075 * h
    head_cy = top + 0.085 * h
    side = view in ("left", "right")
    # Long hair falls over the back: behind the head in front view, on top in back view.
    if p.hair_length == "long" and view != "back":
        back_x = cx - facing * head_w * 0.6 if side else cx
        draw.rectangle([back_x - head_w * 1.05, head_cy - head_h * 0.3, back_x + head_w * 1.05, top + 0.28 * h], fill=p.hair)
    draw.rectangle([cx - head_w * 0.35, head_cy + head_h * 0.7, cx + head_w * 0.35, top + 0.19 * h], fill=p.skin)  # neck
    box = [cx - head_w, head_cy - head_h, cx + head_w, head_cy + head_h]
    if view == "back":
        draw.ellipse(box, fill=p.hair)
        if p.hair_length in ("medium", "long"):
            bottom = top + (0.3 if p.hair_length == "long" else 0.17) * h
            draw.rectangle([cx - head_w, head_cy, cx + head_w, bottom], fill=p.hair)
    else:
        draw.ellipse(box, fill=p.skin)
        draw.chord(box, 180, 360, fill=p.hair)  # hair on top
        if p.hair_length != "short":
            if side:
                back = cx - facing * head_w
                draw.rectangle([min(back, cx), head_cy - head_h * 0.5, max(back, cx), head_cy + head_h * 0.8], fill=p.hair)
            else:
                for sign in (-1, 1):
                    draw.rectangle([cx + sign * head_w * 0.75 - head_w * 0.3, head_cy - head_h * 0.4, cx + sign * head_w * 0.75 + head_w * 0.3, head_cy + head_h * 0.9], fill=p.hair)
    if p.hat is not None:
        draw.chord([cx - head_w * 1.05, head_cy - head_h * 1.15, cx + head_w * 1.05, head_cy + head_h * 0.5], 180, 360, fill=p.hat)
        if view != "back":
            brim = cx + (facing * head_w * 1.6 if side else 0)
            draw.rectangle([min(brim, cx - head_w if not side else cx), head_cy - head_h * 0.4, max(brim, cx + head_w if not side else cx), head_cy - head_h * 0.25], fill=p.hat)


# ----------------------------------------------------------------------------- camera


def _finish(image: Image.Image, camera: Camera, rng) -> bytes:
    """Reduce to crop size, then apply the camera: light, colour cast, blur, noise, JPEG."""
    image = image.reduce(2)
    if camera.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    level = camera.brightness * float(rng.uniform(0.9, 1.1))
    pixels = np.power(pixels, camera.gamma) * camera.gain * level
    pixels = pixels * 255.0 + rng.normal(0.0, camera.noise, pixels.shape)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=camera.jpeg_quality)
    return buffer.getvalue()
