"""Synthetic fine-grained faces: a deterministic PIL renderer, captions, VQA pairs and a dataset writer.

Every face is drawn from a label dict `attributes: dict[str, str]` whose keys and values come from the
constant `SCHEMA` (attribute -> ordered list of values); `FAMILIES` says whether an attribute is
"appearance", "emotion" or "action". An *identity* fixes the stable traits (`IDENTITY_ATTRIBUTES`: face
shape, skin, eyes, eyebrows, nose, hair, facial hair); each render of that identity re-draws the rest
(accessories, make-up, background, expression, actions) and small nuisances (position, scale, shirt and
hat colour) that are not labels.

Left/right are in image coordinates (the viewer's left), e.g. `gaze=left` means the irises are shifted
towards the left edge of the picture.

Some labels can be invisible in a render (eyes behind sunglasses, the mouth behind a mask, the
hairline under a hat or bangs); `hidden_attributes(labels)` names them, and captions / questions never
mention them. Bald faces carry hair_color/hair_type/hairline = "none" and bangs/sideburns = "no".

Drawing happens on a square canvas in 256-unit coordinates (scaled for resolutions above 256) and is
resized to the requested resolution with a Lanczos filter, so features stay anti-aliased at 32 or 64 px.

File format written by `write_synthetic_dataset` (see docs/data.md):

    out_dir/
      schema.json      {"attributes": {name: [values]}, "families": {name: family},
                        "identity_attributes": [...], "resolution": R, "seed": S, "format_version": 1}
      index.jsonl      one JSON record per image:
                        {"image": "images/000123.png", "identity": 30, "split": "train",
                         "caption": "...", "vqa": [{"question", "answer", "attribute", "type"}, ...],
                         "attributes": {name: value}, "hidden": [names], "mentioned": [names]}
      images/*.png     RGB PNGs of R x R pixels

CLI: `python -m unif2ace.data.synthetic OUT_DIR --num-images 1000 --resolution 64 --seed 0`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw

# --------------------------------------------------------------------------------------------------
# Schema

SCHEMA: dict[str, list[str]] = {
    # appearance, stable for an identity
    "face_shape": ["oval", "round", "square", "long"],
    "skin_tone": ["pale", "light", "tan", "brown", "dark"],
    "skin_texture": ["smooth", "freckles", "wrinkles"],
    "eye_color": ["brown", "blue", "green", "grey"],
    "eyebrows": ["thin", "thick", "bushy"],
    "nose": ["small", "big"],
    "hair_length": ["bald", "short", "medium", "long"],
    "hair_color": ["none", "black", "brown", "blonde", "red", "grey"],
    "hair_type": ["none", "straight", "wavy", "curly"],
    "hairline": ["none", "straight", "receding", "widows_peak"],
    "bangs": ["no", "yes"],
    "beard": ["none", "stubble", "goatee", "full"],
    "mustache": ["no", "yes"],
    "sideburns": ["no", "yes"],
    # appearance, varies per render
    "lipstick": ["none", "red", "pink", "purple"],
    "earrings": ["no", "yes"],
    "hat": ["none", "cap", "beanie", "top_hat"],
    "glasses": ["none", "round", "square", "sunglasses"],
    "mask": ["no", "yes"],
    "background": ["blue", "green", "yellow", "purple", "grey", "orange"],
    # emotion
    "emotion": ["neutral", "happy", "surprised", "sad", "angry"],
    # actions
    "mouth_action": ["closed", "smile", "laugh", "open_mouth", "tongue_out"],
    "eye_action": ["open", "wink", "glare", "closed"],
    "head_tilt": ["none", "left", "right"],
    "gaze": ["forward", "left", "right"],
}

FAMILIES: dict[str, str] = {
    name: ("emotion" if name == "emotion" else "action" if name in
           ("mouth_action", "eye_action", "head_tilt", "gaze") else "appearance")
    for name in SCHEMA
}

IDENTITY_ATTRIBUTES: tuple[str, ...] = (
    "face_shape", "skin_tone", "skin_texture", "eye_color", "eyebrows", "nose", "hair_length",
    "hair_color", "hair_type", "hairline", "bangs", "beard", "mustache", "sideburns",
)

# Mouth and eye actions that make sense with each emotion (a sad face does not laugh).
MOUTH_FOR_EMOTION = {
    "neutral": ["closed", "smile", "open_mouth", "tongue_out"],
    "happy": ["closed", "smile", "laugh", "open_mouth", "tongue_out"],
    "surprised": ["closed", "open_mouth"],
    "sad": ["closed", "open_mouth"],
    "angry": ["closed", "open_mouth"],
}
EYES_FOR_EMOTION = {
    "neutral": ["open", "wink", "glare", "closed"],
    "happy": ["open", "wink", "closed"],
    "surprised": ["open", "wink"],
    "sad": ["open", "glare", "closed"],
    "angry": ["open", "glare", "closed"],
}

_TEXT_OVERRIDES = {("hairline", "widows_peak"): "widow's peak", ("head_tilt", "none"): "upright"}


def value_text(attribute: str, value: str) -> str:
    """The short answer text of a label value ("top_hat" -> "top hat", "widows_peak" -> "widow's peak")."""
    return _TEXT_OVERRIDES.get((attribute, value), value.replace("_", " "))


def validate_attributes(labels: dict[str, str], *, complete: bool = True) -> None:
    """Raise ValueError for an unknown attribute name or value (and, if `complete`, a missing one)."""
    for name, value in labels.items():
        if name not in SCHEMA:
            raise ValueError(f"unknown attribute {name!r}; known: {', '.join(SCHEMA)}")
        if value not in SCHEMA[name]:
            raise ValueError(f"attribute {name!r} has unknown value {value!r}; allowed: {SCHEMA[name]}")
    if complete:
        missing = [n for n in SCHEMA if n not in labels]
        if missing:
            raise ValueError(f"missing attributes: {missing}")


def hidden_attributes(labels: dict[str, str]) -> set[str]:
    """Attributes whose value cannot be seen in the render (covered by sunglasses, mask, hat or bangs)."""
    hidden = set()
    if labels["glasses"] == "sunglasses":
        hidden |= {"eye_color", "eye_action", "gaze"}
    if labels["mask"] == "yes":
        hidden |= {"mouth_action", "lipstick", "mustache", "beard"}
    if labels["hat"] != "none":
        hidden |= {"hairline", "bangs"}
    if labels["bangs"] == "yes":
        hidden.add("hairline")
    return hidden


# --------------------------------------------------------------------------------------------------
# Sampling labels

def _pick(rng: random.Random, values, weights=None) -> str:
    return rng.choices(list(values), weights=weights, k=1)[0]


def sample_identity(rng: random.Random) -> dict[str, str]:
    """Draw the stable traits of one identity."""
    s = {
        "face_shape": _pick(rng, SCHEMA["face_shape"]),
        "skin_tone": _pick(rng, SCHEMA["skin_tone"]),
        "skin_texture": _pick(rng, SCHEMA["skin_texture"]),
        "eye_color": _pick(rng, SCHEMA["eye_color"]),
        "eyebrows": _pick(rng, SCHEMA["eyebrows"]),
        "nose": _pick(rng, SCHEMA["nose"]),
        "hair_length": _pick(rng, SCHEMA["hair_length"], [0.15, 0.3, 0.25, 0.3]),
    }
    if s["hair_length"] == "bald":
        s.update(hair_color="none", hair_type="none", hairline="none", bangs="no", sideburns="no")
    else:
        s["hair_color"] = _pick(rng, SCHEMA["hair_color"][1:])
        s["hair_type"] = _pick(rng, SCHEMA["hair_type"][1:])
        s["hairline"] = _pick(rng, SCHEMA["hairline"][1:])
        # bangs only over a straight hairline, so a receding line or widow's peak stays visible
        s["bangs"] = _pick(rng, ["no", "yes"]) if s["hairline"] == "straight" else "no"
        s["sideburns"] = _pick(rng, ["no", "yes"], [0.7, 0.3])
    s["beard"] = _pick(rng, SCHEMA["beard"], [0.4, 0.2, 0.2, 0.2])
    s["mustache"] = _pick(rng, ["no", "yes"], [0.65, 0.35])
    return s


def sample_attributes(rng: random.Random, identity: dict[str, str] | None = None) -> dict[str, str]:
    """Draw a full, consistent label dict; the stable traits come from `identity` when given."""
    labels = dict(identity) if identity is not None else sample_identity(rng)
    labels["lipstick"] = _pick(rng, SCHEMA["lipstick"], [0.55, 0.15, 0.15, 0.15])
    labels["earrings"] = _pick(rng, ["no", "yes"], [0.65, 0.35])
    labels["hat"] = _pick(rng, SCHEMA["hat"], [0.5, 0.17, 0.17, 0.16])
    labels["glasses"] = _pick(rng, SCHEMA["glasses"], [0.45, 0.19, 0.18, 0.18])
    labels["mask"] = _pick(rng, ["no", "yes"], [0.88, 0.12])
    labels["background"] = _pick(rng, SCHEMA["background"])
    labels["emotion"] = _pick(rng, SCHEMA["emotion"])
    labels["mouth_action"] = _pick(rng, MOUTH_FOR_EMOTION[labels["emotion"]])
    labels["eye_action"] = _pick(rng, EYES_FOR_EMOTION[labels["emotion"]])
    labels["head_tilt"] = _pick(rng, SCHEMA["head_tilt"], [0.5, 0.25, 0.25])
    labels["gaze"] = _pick(rng, SCHEMA["gaze"], [0.5, 0.25, 0.25])
    if labels["mask"] == "yes":  # the mouth is covered: keep labels that match what is drawn
        labels["mouth_action"], labels["lipstick"] = "closed", "none"
    if labels["glasses"] == "sunglasses":
        labels["eye_action"], labels["gaze"] = "open", "forward"
    return {name: labels[name] for name in SCHEMA}


# --------------------------------------------------------------------------------------------------
# Rendering

SKIN_RGB = {"pale": (250, 226, 212), "light": (238, 196, 160), "tan": (205, 155, 110),
            "brown": (150, 98, 62), "dark": (88, 58, 38)}
HAIR_RGB = {"black": (28, 26, 26), "brown": (112, 64, 28), "blonde": (242, 206, 96),
            "red": (204, 62, 24), "grey": (165, 165, 168)}
EYE_RGB = {"brown": (105, 55, 18), "blue": (35, 110, 235), "green": (30, 170, 55), "grey": (140, 150, 162)}
LIP_RGB = {"red": (222, 18, 40), "pink": (252, 105, 175), "purple": (128, 28, 150)}
BG_RGB = {"blue": (110, 165, 245), "green": (130, 210, 130), "yellow": (248, 228, 110),
          "purple": (185, 140, 232), "grey": (198, 198, 198), "orange": (250, 160, 80)}
NUISANCE_COLORS = [(200, 40, 40), (30, 50, 130), (40, 120, 60), (120, 50, 140), (230, 120, 20),
                   (40, 140, 160), (90, 90, 90), (240, 240, 240)]
OUTLINE = (40, 28, 24)
FACE_SIZE = {"oval": (62, 80, 2.0), "round": (72, 72, 2.0), "square": (68, 76, 4.0), "long": (54, 88, 2.0)}


def _shade(rgb, f):
    return tuple(max(0, min(255, int(c * f))) for c in rgb)


def _mix(a, b, t):
    return tuple(int(x * (1 - t) + y * t) for x, y in zip(a, b))


@dataclass
class Style:
    """Per-render nuisances that are not labels: head offset/scale, shirt and hat colour, texture seed."""
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    shirt: tuple = (30, 50, 130)
    hat: tuple = (200, 40, 40)
    texture_seed: int = 0

    @staticmethod
    def sample(rng: random.Random) -> "Style":
        return Style(dx=rng.uniform(-6, 6), dy=rng.uniform(-4, 4), scale=rng.uniform(0.95, 1.04),
                     shirt=rng.choice(NUISANCE_COLORS), hat=rng.choice(NUISANCE_COLORS[:6]),
                     texture_seed=rng.randrange(1 << 30))


class _Pen:
    """ImageDraw in 256-unit coordinates, scaled to the canvas."""

    def __init__(self, img: Image.Image, s: float):
        self.img, self.s, self.d = img, s, ImageDraw.Draw(img)

    def _p(self, pts):
        return [(x * self.s, y * self.s) for x, y in pts]

    def _box(self, b):
        return [b[0] * self.s, b[1] * self.s, b[2] * self.s, b[3] * self.s]

    def _w(self, w):
        return max(1, round(w * self.s))

    def poly(self, pts, fill=None, outline=None, width=0):
        self.d.polygon(self._p(pts), fill=fill, outline=outline, width=self._w(width) if outline else 0)

    def line(self, pts, fill, width):
        self.d.line(self._p(pts), fill=fill, width=self._w(width), joint="curve")

    def ellipse(self, box, fill=None, outline=None, width=0):
        self.d.ellipse(self._box(box), fill=fill, outline=outline, width=self._w(width) if outline else 0)

    def rect(self, box, fill=None, outline=None, width=0, radius=0):
        self.d.rounded_rectangle(self._box(box), radius=radius * self.s, fill=fill, outline=outline,
                                 width=self._w(width) if outline else 0)

    def circle(self, c, r, fill=None, outline=None, width=0):
        self.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill, outline, width)

    def mask(self, pts) -> Image.Image:
        m = Image.new("L", self.img.size, 0)
        ImageDraw.Draw(m).polygon(self._p(pts), fill=255)
        return m


def _superellipse(cx, cy, a, b, n, t0=0.0, t1=2 * math.pi, k=96):
    """Points on |x/a|^n + |y/b|^n = 1 for angles t0..t1 (y grows downwards, t=pi/2 is the chin)."""
    pts = []
    for i in range(k + 1):
        t = t0 + (t1 - t0) * i / k
        c, s = math.cos(t), math.sin(t)
        pts.append((cx + a * math.copysign(abs(c) ** (2 / n), c), cy + b * math.copysign(abs(s) ** (2 / n), s)))
    return pts


def _curve(p0, p1, p2, k=12):
    """A quadratic Bezier from p0 to p2 pulled towards p1."""
    out = []
    for i in range(k + 1):
        t = i / k
        out.append(((1 - t) ** 2 * p0[0] + 2 * t * (1 - t) * p1[0] + t * t * p2[0],
                    (1 - t) ** 2 * p0[1] + 2 * t * (1 - t) * p1[1] + t * t * p2[1]))
    return out


def _textured_outline(pts, hair_type, cx, cy):
    """Perturb a hair silhouette along its radius: smooth (straight), a sine (wavy), or bumps (curly)."""
    if hair_type == "straight":
        return pts
    out = []
    for i, (x, y) in enumerate(pts):
        r = math.hypot(x - cx, y - cy) or 1.0
        amp = 5.0 * math.sin(i * 0.9) if hair_type == "wavy" else 7.0 * abs(math.sin(i * 1.6))
        out.append((x + amp * (x - cx) / r, y + amp * (y - cy) / r))
    return out


def render_face(labels: dict[str, str], resolution: int = 64, *, style: Style | None = None,
                seed: int = 0) -> Image.Image:
    """Draw one face for the label dict and return an RGB image of resolution x resolution.

    The result depends only on (labels, resolution, style); `style=None` draws the nuisances from `seed`.
    """
    validate_attributes(labels)
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
    st = style if style is not None else Style.sample(random.Random(seed))
    s = max(1.0, resolution / 256)
    size = round(256 * s)
    L = labels
    skin = SKIN_RGB[L["skin_tone"]]
    hair = HAIR_RGB.get(L["hair_color"], (60, 40, 25))
    brow = _shade(hair, 0.75) if L["hair_color"] not in ("none",) else (60, 40, 25)
    beard_rgb = hair if L["hair_color"] != "none" else (60, 40, 25)

    base = Image.new("RGB", (size, size), BG_RGB[L["background"]])
    pen = _Pen(base, s)
    pen.ellipse((20, 222, 236, 360), fill=st.shirt, outline=OUTLINE, width=3)  # shoulders

    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # the head, rotated for head_tilt
    p = _Pen(layer, s)
    a0, b0, n = FACE_SIZE[L["face_shape"]]
    a, b = a0 * st.scale, b0 * st.scale
    cx, cy = 128 + st.dx, 128 + st.dy
    eye_y, mouth_y = cy - 0.1 * b, cy + 0.52 * b
    brow_y = eye_y - 22
    top = cy - b

    # hair behind the head (silhouette), then neck, ears and face on top of it
    hl = L["hair_length"]
    if hl != "bald":
        arc = _superellipse(cx, cy, a + 9, b + 11, n, math.pi, 2 * math.pi, 48)
        if hl == "short":
            sil = [(cx - a - 6, eye_y + 4)] + arc + [(cx + a + 6, eye_y + 4)]
        else:
            bottom = cy + 0.62 * b if hl == "medium" else 250
            flare = 14 if hl == "medium" else 24
            sil = [(cx - a - flare, bottom)] + arc + [(cx + a + flare, bottom)]
        sil = _textured_outline(sil, L["hair_type"], cx, cy)
        p.poly(sil, fill=hair, outline=_shade(hair, 0.6), width=3)
        if L["hair_type"] == "curly":  # ring of curls along the silhouette
            for x, y in sil[::3]:
                p.circle((x, y), 8, fill=hair, outline=_shade(hair, 0.6), width=2)
    p.rect((cx - 24, cy + b - 30, cx + 24, cy + b + 36), fill=skin)  # neck
    for side in (-1, 1):
        p.ellipse((cx + side * a - 11, eye_y - 6, cx + side * a + 11, eye_y + 26), fill=skin, outline=OUTLINE, width=2)
    face = _superellipse(cx, cy, a, b, n)
    p.poly(face, fill=skin, outline=OUTLINE, width=3)

    trng = random.Random(st.texture_seed)
    dark = _shade(skin, 0.62)
    if L["skin_texture"] == "freckles":
        for side in (-1, 1):
            for _ in range(9):
                fx = cx + side * trng.uniform(14, 0.62 * a)
                fy = eye_y + trng.uniform(14, 34)
                p.circle((fx, fy), 3.2, fill=_mix(dark, (120, 60, 20), 0.4))
    elif L["skin_texture"] == "wrinkles":
        for k in range(3):
            y = brow_y - 10 - 7 * k
            p.line(_curve((cx - 26, y + 2), (cx, y - 4), (cx + 26, y + 2)), fill=dark, width=3)
        for side in (-1, 1):
            ex = cx + side * 0.42 * a
            for dy in (-5, 3):
                p.line([(ex + side * 19, eye_y + dy * 0.3), (ex + side * 30, eye_y + dy)], fill=dark, width=3)
            p.line(_curve((cx + side * 16, mouth_y - 22), (cx + side * 26, mouth_y - 6), (cx + side * 24, mouth_y + 6)),
                   fill=dark, width=3)

    # facial hair
    lower = [(x, y) for x, y in face if y >= cy + 0.12 * b]
    if L["beard"] in ("stubble", "full"):
        col = beard_rgb if L["beard"] == "full" else _mix(skin, beard_rgb, 0.45)
        p.poly(lower, fill=col)
        if L["beard"] == "full":
            p.line(lower, fill=_shade(beard_rgb, 0.7), width=3)
    elif L["beard"] == "goatee":
        p.ellipse((cx - 20, mouth_y + 6, cx + 20, cy + b + 4), fill=beard_rgb, outline=_shade(beard_rgb, 0.7), width=2)

    # hair over the forehead: the silhouette cut below the hairline
    if hl != "bald":
        hy = cy - 0.55 * b
        xl, xr = cx - a - 30, cx + a + 30
        if L["bangs"] == "yes":
            edge = [(xl, brow_y - 4)] + [(cx - a + 12 * i, brow_y - 8 + (6 if i % 2 else -2)) for i in range(int(2 * a / 12) + 1)] + [(xr, brow_y - 4)]
        elif L["hairline"] == "receding":
            edge = [(xl, hy + 20), (cx - 0.75 * a, hy + 16), (cx - 0.45 * a, hy - 22), (cx, hy - 4),
                    (cx + 0.45 * a, hy - 22), (cx + 0.75 * a, hy + 16), (xr, hy + 20)]
        elif L["hairline"] == "widows_peak":
            edge = [(xl, hy + 10), (cx - 0.6 * a, hy - 2), (cx - 8, hy + 4), (cx, hy + 18), (cx + 8, hy + 4),
                    (cx + 0.6 * a, hy - 2), (xr, hy + 10)]
        else:
            edge = [(xl, hy + 12)] + _curve((cx - a, hy + 8), (cx, hy - 8), (cx + a, hy + 8)) + [(xr, hy + 12)]
        region = edge + [(xr, -40), (xl, -40)]
        head = _superellipse(cx, cy, a + 9, b + 11, n, math.pi, 2 * math.pi, 48)
        head = [(cx - a - 9, eye_y + 4)] + head + [(cx + a + 9, eye_y + 4)]
        m = ImageChops.multiply(p.mask(region), p.mask(head))
        layer.paste(hair + (255,), (0, 0), m)
        if L["sideburns"] == "yes":
            for side in (-1, 1):
                x0 = cx + side * (a - 2)
                p.poly([(x0, eye_y - 20), (x0 - side * 13, eye_y - 20), (x0 - side * 11, eye_y + 26), (x0, eye_y + 30)],
                       fill=hair, outline=_shade(hair, 0.6), width=2)

    # eyes
    for i, side in enumerate((-1, 1)):
        ex = cx + side * 0.42 * a
        state = L["eye_action"]
        if state == "wink":
            state = "closed" if side == 1 else "open"  # the eye on the viewer's right closes
        if state == "closed":
            p.line(_curve((ex - 15, eye_y), (ex, eye_y + 9), (ex + 15, eye_y)), fill=OUTLINE, width=4)
            continue
        h = 13 if L["emotion"] == "surprised" else 10
        p.ellipse((ex - 15, eye_y - h, ex + 15, eye_y + h), fill=(255, 255, 255), outline=OUTLINE, width=2)
        gx = {"forward": 0, "left": -7, "right": 7}[L["gaze"]]
        p.circle((ex + gx, eye_y + 1), 8, fill=EYE_RGB[L["eye_color"]])
        p.circle((ex + gx, eye_y + 1), 3.5, fill=(10, 10, 10))
        if state == "glare":  # heavy upper lid covering the top half
            p.rect((ex - 17, eye_y - h - 3, ex + 17, eye_y - 1), fill=skin)
            p.line([(ex - 16, eye_y - 1), (ex + 16, eye_y - 1)], fill=OUTLINE, width=4)

    # eyebrows: thickness from the identity, angle from the emotion
    bw = {"thin": 4, "thick": 8, "bushy": 13}[L["eyebrows"]]
    inner, outer, arch = {"neutral": (0, 0, 0), "happy": (-2, 2, -6), "surprised": (-10, -8, -8),
                          "sad": (-9, 5, 0), "angry": (9, -6, 0)}[L["emotion"]]
    for side in (-1, 1):
        ex = cx + side * 0.42 * a
        pi_, po = (ex - side * 14, brow_y + inner), (ex + side * 16, brow_y + outer)
        mid = ((pi_[0] + po[0]) / 2, (pi_[1] + po[1]) / 2 + arch)
        p.line(_curve(pi_, mid, po), fill=brow, width=bw)

    # nose
    ny0, ny1 = eye_y + 8, mouth_y - 18
    if L["nose"] == "big":
        p.poly([(cx, ny0 - 4), (cx - 13, ny1), (cx + 13, ny1)], fill=_shade(skin, 0.88), outline=_shade(skin, 0.55), width=3)
    else:
        p.line([(cx, ny0), (cx - 4, ny1 - 2), (cx + 3, ny1)], fill=_shade(skin, 0.6), width=3)

    # mustache and mouth
    lip = LIP_RGB.get(L["lipstick"], _mix(_shade(skin, 0.7), (150, 50, 50), 0.35))
    lw = 8 if L["lipstick"] != "none" else 5
    ma = L["mouth_action"]
    if ma == "closed" or ma == "tongue_out":
        w, k = {"neutral": (22, 0), "happy": (24, 8), "surprised": (12, 0), "sad": (22, -8), "angry": (18, -4)}[L["emotion"]]
        if ma == "tongue_out":
            p.ellipse((cx - 11, mouth_y - 2, cx + 11, mouth_y + 24), fill=(240, 100, 120), outline=_shade((240, 100, 120), 0.6), width=2)
        p.line(_curve((cx - w, mouth_y - k), (cx, mouth_y + k), (cx + w, mouth_y - k)), fill=lip, width=lw)
    elif ma == "smile":
        p.line(_curve((cx - 32, mouth_y - 12), (cx, mouth_y + 16), (cx + 32, mouth_y - 12)), fill=lip, width=lw + 1)
    elif ma == "laugh":
        pts = [(cx - 30, mouth_y - 7)] + _curve((cx - 30, mouth_y - 7), (cx, mouth_y + 34), (cx + 30, mouth_y - 7))
        p.poly(pts, fill=(90, 18, 30), outline=lip, width=lw)
        p.rect((cx - 22, mouth_y - 5, cx + 22, mouth_y + 2), fill=(255, 255, 255))
    elif ma == "open_mouth":
        p.ellipse((cx - 13, mouth_y - 12, cx + 13, mouth_y + 16), fill=(90, 18, 30), outline=lip, width=lw)
    if L["mustache"] == "yes":
        p.poly([(cx - 28, mouth_y - 8), (cx - 8, mouth_y - 19), (cx, mouth_y - 15), (cx + 8, mouth_y - 19),
                (cx + 28, mouth_y - 8), (cx, mouth_y - 10)], fill=beard_rgb, outline=_shade(beard_rgb, 0.6), width=2)

    # accessories
    if L["mask"] == "yes":
        region = [(x, y) for x, y in _superellipse(cx, cy, a + 2, b + 2, n) if y >= mouth_y - 24]
        p.poly(region, fill=(205, 228, 245), outline=(110, 140, 175), width=3)
        for dy in (-6, 6):
            p.line([(cx - 0.6 * a, mouth_y + dy), (cx + 0.6 * a, mouth_y + dy)], fill=(150, 175, 205), width=2)
        for side in (-1, 1):
            p.line([(cx + side * 0.8 * a, mouth_y - 20), (cx + side * (a + 2), eye_y + 6)], fill=(110, 140, 175), width=3)
    g = L["glasses"]
    if g != "none":
        frame = (22, 22, 26)
        for side in (-1, 1):
            ex = cx + side * 0.42 * a
            if g == "round":
                p.circle((ex, eye_y), 19, outline=frame, width=6)
            elif g == "square":
                p.rect((ex - 21, eye_y - 15, ex + 21, eye_y + 15), outline=frame, width=6)
            else:
                p.rect((ex - 22, eye_y - 14, ex + 22, eye_y + 15), fill=(18, 20, 34), outline=frame, width=4, radius=9)
                p.line([(ex - 12, eye_y - 6), (ex - 4, eye_y - 10)], fill=(120, 130, 170), width=3)
            p.line([(ex + side * 20, eye_y - 4), (cx + side * (a + 2), eye_y - 6)], fill=frame, width=4)
        p.line([(cx - 0.42 * a + 19, eye_y - 2), (cx + 0.42 * a - 19, eye_y - 2)], fill=frame, width=5)
    if L["earrings"] == "yes":
        for side in (-1, 1):
            p.circle((cx + side * (a + 3), eye_y + 36), 10, outline=(250, 196, 0), width=5)
    hat = L["hat"]
    hb = brow_y - 12  # lowest line of a hat
    if hat in ("cap", "beanie"):  # a dome: the upper half of an ellipse resting on the hat line
        rise = hb - top + (22 if hat == "cap" else 26)
        dome = _superellipse(cx, hb, a + 8, rise, 2, math.pi, 2 * math.pi, 48)
        p.poly(dome, fill=st.hat, outline=OUTLINE, width=3)
        if hat == "cap":
            p.ellipse((cx - a - 24, hb - 8, cx + a + 24, hb + 10), fill=_shade(st.hat, 0.65), outline=OUTLINE, width=2)
        else:
            p.rect((cx - a - 10, hb - 16, cx + a + 10, hb + 2), fill=_shade(st.hat, 0.7), outline=OUTLINE, width=2, radius=6)
            p.circle((cx, hb - rise), 12, fill=(245, 245, 245), outline=OUTLINE, width=2)
    elif hat == "top_hat":
        black = (26, 24, 28)
        p.rect((cx - 0.72 * a, top - 58, cx + 0.72 * a, hb), fill=black, outline=(70, 70, 80), width=2)
        p.rect((cx - 0.72 * a, hb - 20, cx + 0.72 * a, hb - 10), fill=st.hat)
        p.rect((cx - a - 22, hb - 6, cx + a + 22, hb + 6), fill=black, outline=(70, 70, 80), width=2, radius=5)

    angle = {"none": 0, "left": 14, "right": -14}[L["head_tilt"]]  # positive rotates counter-clockwise
    if angle:
        layer = layer.rotate(angle, resample=Image.BICUBIC, center=(cx * s, (cy + b + 30) * s))
    base.paste(layer, (0, 0), layer)
    if size != resolution:
        base = base.resize((resolution, resolution), Image.LANCZOS)
    return base


# --------------------------------------------------------------------------------------------------
# Captions

# Keywords that a caption phrase about (attribute, value) contains; used by the phrase tables below and
# by tests to check a caption against its labels.
CAPTION_KEYWORDS: dict[str, dict[str, list[str]]] = {
    "face_shape": {v: [v] for v in SCHEMA["face_shape"]},
    "skin_tone": {v: [v] for v in SCHEMA["skin_tone"]},
    "skin_texture": {"smooth": ["smooth"], "freckles": ["freckle"], "wrinkles": ["wrinkle"]},
    "eye_color": {v: [v] for v in SCHEMA["eye_color"]},
    "eyebrows": {v: [v] for v in SCHEMA["eyebrows"]},
    "nose": {v: [v] for v in SCHEMA["nose"]},
    "hair_length": {"bald": ["bald"], "short": ["short"], "medium": ["medium"], "long": ["long"]},
    "hair_color": {v: [v] for v in SCHEMA["hair_color"][1:]},
    "hair_type": {v: [v] for v in SCHEMA["hair_type"][1:]},
    "hairline": {"straight": ["straight hairline"], "receding": ["receding"], "widows_peak": ["widow's peak"]},
    "bangs": {"yes": ["bangs"], "no": ["no bangs"]},
    "beard": {"none": ["clean-shaven", "no beard"], "stubble": ["stubble", "five o'clock shadow"],
              "goatee": ["goatee"], "full": ["full beard"]},
    "mustache": {"yes": ["mustache"], "no": ["no mustache"]},
    "sideburns": {"yes": ["sideburns"], "no": ["no sideburns"]},
    "lipstick": {"none": ["no lipstick"], "red": ["red lipstick"], "pink": ["pink lipstick"],
                 "purple": ["purple lipstick"]},
    "earrings": {"yes": ["earrings"], "no": ["no earrings"]},
    "hat": {"none": ["no hat"], "cap": ["cap"], "beanie": ["beanie"], "top_hat": ["top hat"]},
    "glasses": {"none": ["no glasses"], "round": ["round glasses"], "square": ["square glasses"],
                "sunglasses": ["sunglasses"]},
    "mask": {"yes": ["mask"], "no": ["no mask"]},
    "background": {v: [v] for v in SCHEMA["background"]},
    "emotion": {v: [v] for v in SCHEMA["emotion"]},
    "mouth_action": {"closed": ["mouth closed", "closed mouth"], "smile": ["smil"], "laugh": ["laugh"],
                     "open_mouth": ["mouth open", "open mouth", "mouth wide open"], "tongue_out": ["tongue"]},
    "eye_action": {"open": ["eyes open", "open eyes"], "wink": ["wink"], "glare": ["glar"],
                   "closed": ["eyes closed", "closed eyes"]},
    "head_tilt": {"none": ["upright"], "left": ["to the left"], "right": ["to the right"]},
    "gaze": {"forward": ["straight ahead", "forward"], "left": ["towards the left", "to their left side"],
             "right": ["towards the right", "to their right side"]},
}

# Predicate phrases per (attribute, value): "{v}" is the value text, "{an}" its article.
_PHRASES: dict[str, dict[str, list[str]] | list[str]] = {
    "face_shape": ["has {an} {v} face", "has {an} {v}-shaped face", "has a face that is {v} in shape"],
    "skin_tone": ["has {v} skin", "has {an} {v} complexion", "has {v}-toned skin"],
    "skin_texture": {"smooth": ["has smooth skin", "has a smooth complexion"],
                     "freckles": ["has freckles on both cheeks", "has a freckled face", "is covered in freckles"],
                     "wrinkles": ["has wrinkles on the forehead", "shows a few wrinkles", "has a wrinkled face"]},
    "eye_color": ["has {v} eyes", "has eyes that are {v}"],
    "eyebrows": ["has {v} eyebrows", "has {v} brows"],
    "nose": ["has {an} {v} nose", "has a rather {v} nose"],
    "hairline": {"straight": ["has a straight hairline"], "receding": ["has a receding hairline", "is receding at the temples"],
                 "widows_peak": ["has a widow's peak", "has a hairline with a widow's peak"]},
    "bangs": {"yes": ["has bangs", "wears bangs over the forehead"], "no": ["has no bangs"]},
    "beard": {"none": ["is clean-shaven", "has no beard"], "stubble": ["has stubble", "has a five o'clock shadow"],
              "goatee": ["has a goatee", "sports a goatee"], "full": ["has a full beard", "wears a full beard"]},
    "mustache": {"yes": ["has a mustache", "sports a mustache"], "no": ["has no mustache"]},
    "sideburns": {"yes": ["has sideburns", "wears long sideburns"], "no": ["has no sideburns"]},
    "lipstick": {"none": ["wears no lipstick"], "red": ["wears red lipstick", "is wearing red lipstick"],
                 "pink": ["wears pink lipstick", "has pink lipstick on"],
                 "purple": ["wears purple lipstick", "has purple lipstick on"]},
    "earrings": {"yes": ["wears gold hoop earrings", "is wearing earrings"], "no": ["wears no earrings"]},
    "hat": {"none": ["wears no hat"], "cap": ["wears a cap", "has a cap on"],
            "beanie": ["wears a beanie", "has a knitted beanie on"], "top_hat": ["wears a top hat", "has a tall top hat on"]},
    "glasses": {"none": ["wears no glasses"], "round": ["wears round glasses", "has round glasses on"],
                "square": ["wears square glasses", "has square glasses on"],
                "sunglasses": ["wears sunglasses", "has dark sunglasses on"]},
    "mask": {"yes": ["wears a face mask", "has a mask over the mouth and nose"], "no": ["wears no mask"]},
    "background": ["is pictured against {an} {v} background", "stands in front of {an} {v} backdrop"],
    "emotion": ["looks {v}", "appears {v}", "has {an} {v} expression", "seems {v}"],
    "mouth_action": {"closed": ["keeps the mouth closed", "has a closed mouth"],
                     "smile": ["is smiling", "has a broad smile"], "laugh": ["is laughing", "laughs out loud"],
                     "open_mouth": ["has the mouth open", "has an open mouth", "has the mouth wide open"],
                     "tongue_out": ["sticks the tongue out", "is showing the tongue"]},
    "eye_action": {"open": ["has both eyes open", "keeps the eyes open"], "wink": ["is winking", "winks one eye"],
                   "glare": ["is glaring", "glares with narrowed eyes"],
                   "closed": ["has the eyes closed", "keeps both eyes closed"]},
    "head_tilt": {"none": ["holds the head upright"], "left": ["tilts the head to the left"],
                  "right": ["tilts the head to the right"]},
    "gaze": {"forward": ["looks straight ahead", "gazes forward"], "left": ["looks towards the left"],
             "right": ["looks towards the right"]},
}

_SUBJECTS = ["The person", "This person", "The individual", "The subject", "The face in the picture"]
_STANDALONE = {  # whole sentences for some attributes, for variety
    "background": ["The background is {v}.", "Behind the person is a plain {v} background."],
    "emotion": ["The expression is {v}.", "Overall, the mood is {v}."],
    "eye_color": ["The eyes are {v}.", "Their eye colour is {v}."],
    "face_shape": ["The face is {v}.", "Their face has {an} {v} shape."],
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _hair_phrase(labels, rng) -> tuple[str, list[str]]:
    """One phrase describing hair length/type/colour together, e.g. "has long wavy red hair"."""
    if labels["hair_length"] == "bald":
        return rng.choice(["is bald", "has a bald head"]), ["hair_length"]
    parts = [a for a in ("hair_length", "hair_type", "hair_color") if rng.random() < 0.85] or ["hair_color"]
    words = [("medium-length" if labels[a] == "medium" else labels[a]) for a in parts]
    if rng.random() < 0.5:
        return "has " + " ".join(words) + " hair", parts
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return "has hair that is " + listed, parts


def _caption_candidates(labels, hidden):
    """Attributes that a caption may talk about (visible and meaningful for this face)."""
    out = []
    for name in SCHEMA:
        if name in hidden or name in ("hair_length", "hair_type", "hair_color"):
            continue
        if labels["hair_length"] == "bald" and name in ("hairline", "bangs", "sideburns"):
            continue
        out.append(name)
    return out


def make_caption(labels: dict[str, str], rng: random.Random, *, min_mentions: int = 12) -> tuple[str, dict[str, str]]:
    """A several-sentence caption in varied wording; returns (caption, {attribute: phrase used}).

    Every mentioned attribute is visible and its phrase contains one of CAPTION_KEYWORDS[attr][label].
    Positive facts (accessories worn, actions) are always kept; the rest is sampled.
    """
    validate_attributes(labels)
    hidden = hidden_attributes(labels)
    cands = _caption_candidates(labels, hidden)
    negative = {(a, v) for a in ("bangs", "mustache", "sideburns", "earrings", "mask") for v in ["no"]} | {
        ("lipstick", "none"), ("hat", "none"), ("glasses", "none")}
    must = [a for a in cands if (a, labels[a]) not in negative and a in (
        "hat", "glasses", "mask", "earrings", "lipstick", "beard", "mustache", "emotion", "mouth_action")]
    rest = [a for a in cands if a not in must]
    rng.shuffle(rest)
    k = max(0, min(len(rest), rng.randint(min_mentions - 2, min_mentions + 5) - len(must)))
    chosen = must + rest[:k]
    rng.shuffle(chosen)

    mentions: dict[str, str] = {}
    clauses: list[tuple[str, bool]] = []  # (text, is_sentence)
    hair_text, hair_parts = _hair_phrase(labels, rng)
    clauses.append((hair_text, False))
    for a in hair_parts:
        mentions[a] = hair_text
    for a in chosen:
        v = value_text(a, labels[a])
        if a in _STANDALONE and rng.random() < 0.35:
            text, sentence = rng.choice(_STANDALONE[a]), True
        else:
            table = _PHRASES[a]
            text, sentence = rng.choice(table[labels[a]] if isinstance(table, dict) else table), False
        text = text.format(v=v, an=_article(v))
        mentions[a] = text
        clauses.append((text, sentence))
    rng.shuffle(clauses)

    sentences, pending = [], []

    def flush():
        if pending:
            body = pending[0] if len(pending) == 1 else ", ".join(pending[:-1]) + " and " + pending[-1]
            sentences.append(f"{rng.choice(_SUBJECTS)} {body}.")
            pending.clear()

    for text, is_sentence in clauses:
        if is_sentence:
            flush()
            sentences.append(text)
        else:
            pending.append(text)
            if len(pending) >= rng.randint(2, 4):
                flush()
    flush()
    return " ".join(sentences), mentions


# --------------------------------------------------------------------------------------------------
# Question-answer pairs

_WHAT_QUESTIONS = {
    "hair_color": ["What colour is the hair?", "What is the hair colour?", "What color is this person's hair?"],
    "hair_length": ["How long is the hair?", "What is the hair length?"],
    "hair_type": ["Is the hair straight, wavy or curly?", "What type of hair does the person have?"],
    "hairline": ["What kind of hairline does the person have?"],
    "eye_color": ["What colour are the eyes?", "What is the eye colour?"],
    "face_shape": ["What shape is the face?", "What is the face shape?"],
    "skin_tone": ["What is the skin tone?", "How would you describe the skin colour?"],
    "skin_texture": ["What is the skin texture: smooth, freckles or wrinkles?"],
    "eyebrows": ["How thick are the eyebrows?", "What are the eyebrows like?"],
    "nose": ["Is the nose small or big?", "How big is the nose?"],
    "beard": ["What kind of beard does the person have?"],
    "hat": ["What kind of hat is the person wearing?"],
    "glasses": ["What type of glasses is the person wearing?"],
    "lipstick": ["What colour is the lipstick?"],
    "background": ["What colour is the background?"],
    "emotion": ["What emotion does the person show?", "How does the person feel?", "What is the facial expression?"],
    "mouth_action": ["What is the person doing with the mouth?"],
    "eye_action": ["What are the eyes doing?"],
    "head_tilt": ["Which way is the head tilted?"],
    "gaze": ["Which direction is the person looking?"],
}

# yes/no questions: attribute, question, predicate on the labels, extra applicability condition
_YESNO = [
    ("glasses", "Is the person wearing glasses?", lambda L: L["glasses"] != "none", None),
    ("hat", "Is the person wearing a hat?", lambda L: L["hat"] != "none", None),
    ("earrings", "Is the person wearing earrings?", lambda L: L["earrings"] == "yes", None),
    ("mask", "Is the person wearing a face mask?", lambda L: L["mask"] == "yes", None),
    ("bangs", "Does the person have bangs?", lambda L: L["bangs"] == "yes", lambda L: L["hair_length"] != "bald"),
    ("beard", "Does the person have a beard?", lambda L: L["beard"] in ("goatee", "full"), lambda L: L["beard"] != "stubble"),
    ("mustache", "Does the person have a mustache?", lambda L: L["mustache"] == "yes", None),
    ("sideburns", "Does the person have sideburns?", lambda L: L["sideburns"] == "yes", lambda L: L["hair_length"] != "bald"),
    ("lipstick", "Is the person wearing lipstick?", lambda L: L["lipstick"] != "none", None),
    ("hair_length", "Is the person bald?", lambda L: L["hair_length"] == "bald", None),
    ("skin_texture", "Does the person have freckles?", lambda L: L["skin_texture"] == "freckles", None),
    ("mouth_action", "Is the person smiling?", lambda L: L["mouth_action"] in ("smile", "laugh"), None),
    ("eye_action", "Is the person winking?", lambda L: L["eye_action"] == "wink", None),
    ("mouth_action", "Is the person's mouth open?", lambda L: L["mouth_action"] in ("laugh", "open_mouth"),
     lambda L: L["mouth_action"] != "tongue_out"),
]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]


def count_accessories(labels: dict[str, str]) -> int:
    """Hat, glasses, earrings (one pair) and face mask: how many are worn."""
    return sum([labels["hat"] != "none", labels["glasses"] != "none", labels["earrings"] == "yes", labels["mask"] == "yes"])


def closed_eyes(labels: dict[str, str]) -> int:
    return {"wink": 1, "closed": 2}.get(labels["eye_action"], 0)


def describe_hair(labels: dict[str, str]) -> str:
    if labels["hair_length"] == "bald":
        return "bald"
    length = "medium-length" if labels["hair_length"] == "medium" else labels["hair_length"]
    return f"{length} {labels['hair_type']} {labels['hair_color']} hair"


def describe_accessories(labels: dict[str, str]) -> str:
    items = []
    if labels["hat"] != "none":
        items.append(f"{_article(labels['hat'])} {value_text('hat', labels['hat'])}")
    if labels["glasses"] != "none":
        items.append("sunglasses" if labels["glasses"] == "sunglasses" else f"{labels['glasses']} glasses")
    if labels["earrings"] == "yes":
        items.append("earrings")
    if labels["mask"] == "yes":
        items.append("a face mask")
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_vqa(labels: dict[str, str], rng: random.Random, *, num_questions: int = 8) -> list[dict[str, str]]:
    """Question-answer pairs about visible attributes.

    Each item is {"question", "answer", "attribute", "type"} with type in
    "what" (answer = value_text(attribute, label)), "yesno" ("yes"/"no"), "count" (a number word) or
    "describe" (a short phrase built from several labels; attribute names the main one).
    """
    validate_attributes(labels)
    hidden = hidden_attributes(labels)
    bald = labels["hair_length"] == "bald"
    what = []
    for a, qs in _WHAT_QUESTIONS.items():
        if a in hidden or (bald and a in ("hair_color", "hair_type", "hairline")):
            continue
        if (a == "hat" and labels["hat"] == "none") or (a == "glasses" and labels["glasses"] == "none") \
                or (a == "lipstick" and labels["lipstick"] == "none"):
            continue
        what.append({"question": rng.choice(qs), "answer": value_text(a, labels[a]), "attribute": a, "type": "what"})
    yesno = [{"question": q, "answer": "yes" if pred(labels) else "no", "attribute": a, "type": "yesno"}
             for a, q, pred, cond in _YESNO if a not in hidden and (cond is None or cond(labels))]
    count = [{"question": "How many accessories is the person wearing?",
              "answer": NUMBER_WORDS[count_accessories(labels)], "attribute": "accessories", "type": "count"},
             {"question": "How many earrings is the person wearing?",
              "answer": "two" if labels["earrings"] == "yes" else "zero", "attribute": "earrings", "type": "count"}]
    if "eye_action" not in hidden:
        count.append({"question": "How many eyes are closed?", "answer": NUMBER_WORDS[closed_eyes(labels)],
                      "attribute": "eye_action", "type": "count"})
    describe = [{"question": "Describe the hair.", "answer": describe_hair(labels), "attribute": "hair_length", "type": "describe"},
                {"question": "What accessories is the person wearing?", "answer": describe_accessories(labels),
                 "attribute": "accessories", "type": "describe"}]
    for pool in (what, yesno, count, describe):
        rng.shuffle(pool)
    n_what = max(1, num_questions - 4)
    items = what[:n_what] + yesno[:2] + count[:1] + describe[:1]
    leftovers = what[n_what:] + yesno[2:]
    items += leftovers[: max(0, num_questions - len(items))]
    rng.shuffle(items)
    return items[:num_questions]


# --------------------------------------------------------------------------------------------------
# Samples, splits and the dataset writer

SPLITS = ("train", "validation", "test")


def _split_of_rank(rank: int, n: int) -> str:
    n_val = n_test = n // 10 if n >= 10 else int(n >= 3)
    if rank < n - n_val - n_test:
        return "train"
    return "validation" if rank < n - n_test else "test"


def identity_splits(num_identities: int, seed: int = 0) -> list[str]:
    """Split of every identity id: 80/10/10 over a seeded permutation of the ids (at least one
    validation and one test identity once there are 3 or more)."""
    order = list(range(num_identities))
    random.Random(f"split-{seed}").shuffle(order)
    out = [""] * num_identities
    for rank, ident in enumerate(order):
        out[ident] = _split_of_rank(rank, num_identities)
    return out


def generate_sample(index: int, *, seed: int = 0, images_per_identity: int = 4, resolution: int = 64) -> dict:
    """The index-th sample of a synthetic set: {"image": PIL, "identity", "attributes", "caption", "vqa", ...}.

    Deterministic in (index, seed, images_per_identity, resolution): identity traits come from an RNG keyed by
    (seed, identity), everything else from an RNG keyed by (seed, index).
    """
    if images_per_identity < 1:
        raise ValueError("images_per_identity must be >= 1")
    identity = index // images_per_identity
    traits = sample_identity(random.Random(f"identity-{seed}-{identity}"))
    rng = random.Random(f"image-{seed}-{index}")
    labels = sample_attributes(rng, traits)
    style = Style.sample(rng)
    caption, mentions = make_caption(labels, rng)
    vqa = make_vqa(labels, rng)
    return {"image": render_face(labels, resolution, style=style), "identity": identity, "attributes": labels,
            "caption": caption, "vqa": vqa, "hidden": sorted(hidden_attributes(labels)), "mentioned": sorted(mentions)}


def synthetic_images(num_images: int, resolution: int = 64, *, seed: int = 0, images_per_identity: int = 4):
    """A float tensor [N, 3, R, R] in [-1, 1] of synthetic faces (no text), for tokenizer training."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(generate_sample(i, seed=seed, images_per_identity=images_per_identity,
                                               resolution=resolution)["image"]) for i in range(num_images)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def schema_dict() -> dict:
    """The JSON-able schema written to schema.json."""
    return {"attributes": {k: list(v) for k, v in SCHEMA.items()}, "families": dict(FAMILIES),
            "identity_attributes": list(IDENTITY_ATTRIBUTES), "format_version": 1}


def write_synthetic_dataset(out_dir: str, num_images: int, *, resolution: int = 64, seed: int = 0,
                            images_per_identity: int = 4, progress: bool = True) -> str:
    """Render `num_images` faces into `out_dir` (images/*.png, index.jsonl, schema.json); returns index path.

    Splits are by identity (80/10/10, see `identity_splits`), so no identity crosses splits.
    """
    from unif2ace.progress import progress_bar

    if num_images < 1:
        raise ValueError("num_images must be >= 1")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    num_identities = (num_images + images_per_identity - 1) // images_per_identity
    splits = identity_splits(num_identities, seed)
    index_path = os.path.join(out_dir, "index.jsonl")
    with open(index_path, "w") as f:
        for i in progress_bar(range(num_images), desc="rendering faces", disable=not progress):
            sample = generate_sample(i, seed=seed, images_per_identity=images_per_identity, resolution=resolution)
            rel = f"images/{i:06d}.png"
            sample.pop("image").save(os.path.join(out_dir, rel))
            record = {"image": rel, "identity": sample["identity"], "split": splits[sample["identity"]], **{
                k: sample[k] for k in ("caption", "vqa", "attributes", "hidden", "mentioned")}}
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(out_dir, "schema.json"), "w") as f:
        json.dump({**schema_dict(), "resolution": resolution, "seed": seed,
                   "images_per_identity": images_per_identity, "num_images": num_images}, f, indent=1)
    return index_path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic fine-grained face data set.")
    ap.add_argument("out_dir")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-identity", type=int, default=4)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    path = write_synthetic_dataset(args.out_dir, args.num_images, resolution=args.resolution, seed=args.seed,
                                   images_per_identity=args.images_per_identity, progress=not args.quiet)
    print(path)


if __name__ == "__main__":
    main()
