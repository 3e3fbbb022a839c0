"""Pixels from any image: PIL's modes to uint8 grey or RGB, and the resize that makes them R x R.

Modes: transparency (RGBA, LA, PA, P with a transparent colour) is composited onto white;
palettes, CMYK and the other colour modes become RGB; 16-bit grey (I;16, I) is divided by 257;
F is clipped to [0, 255]; 1 becomes L. Grey among colour is repeated to three channels, colour
becomes one channel by PIL's L conversion. Resizing takes the shorter side to R with LANCZOS
(antialiased), then crops the centre R x R.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffuse.errors import UserError

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
MAX_UPSCALE = 8  # a side smaller than R / 8 is refused: the result would be mostly interpolation


def is_gray(mode: str) -> bool:
    return mode in GRAY_MODES


def flatten(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 'L' or 'RGB' (the rules of the module docstring)."""
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode in ("LA", "La"):
        img = img.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a, 0, 255) if mode == "F" else np.clip(a, 0, 65535) / 257  # 65535 / 257 = 255
        return Image.fromarray(np.rint(a).astype(np.uint8), "L")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img).convert("L" if mode in ("LA", "La") else "RGB")
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if mode == "1" else "RGB")  # 1, CMYK, YCbCr, LAB, HSV, RGBX, ...
    return img


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """An L or RGB image with `channels` channels: grey repeated, or colour by PIL's L conversion."""
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def fit(img: Image.Image, r: int) -> Image.Image:
    """Shorter side to r (LANCZOS), then the centre r x r."""
    w, h = img.size
    if (w, h) == (r, r):
        return img
    s = r / min(w, h)
    size = (max(r, round(w * s)), max(r, round(h * s)))
    if size != (w, h):
        img = img.resize(size, Image.LANCZOS)
    left, top = (size[0] - r) // 2, (size[1] - r) // 2
    return img.crop((left, top, left + r, top + r))


def convert(image: Image.Image | np.ndarray, r: int, channels: int) -> np.ndarray:
    """A PIL image, or a uint8 array (H, W, C), as uint8 (r, r, channels)."""
    if isinstance(image, np.ndarray):
        if image.shape == (r, r, channels):
            return image
        image = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    img = fit(to_channels(flatten(image), channels), r)
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def check_sizes(sizes: set[tuple[int, int]], r: int, crop: str, what: str) -> None:
    """Refuse non-square images under --crop refuse, and any image that would be upscaled more than 8x."""
    if crop == "refuse":
        bad = sorted(s for s in sizes if s[0] != s[1])
        if bad:
            raise UserError(f"{what} include non-square images ({bad[0][0]}x{bad[0][1]}) and --crop refuse was "
                            "given; crop them square first or drop --crop refuse to centre-crop them.")
    small = min(min(s) for s in sizes)
    if small * MAX_UPSCALE < r:
        raise UserError(f"{what} include an image with a {small}-pixel side, which resolution {r} would upscale "
                        f"more than {MAX_UPSCALE}x; give a smaller --resolution or remove the small images.")


def default_resolution(sizes: set[tuple[int, int]], what: str) -> int:
    """The images' common size where all are square and equal; otherwise a refusal asking for --resolution."""
    if len(sizes) == 1:
        (w, h), = sizes
        if w == h:
            return w
    shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
    raise UserError(f"{what} are not all square and of one size ({shown}{', ...' if len(sizes) > 3 else ''}); "
                    "give --resolution R to resize and centre-crop them to R x R.")
