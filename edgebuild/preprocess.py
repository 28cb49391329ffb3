# edgebuild preprocessing: the ONE function that turns an image file into a model input.
#
# This module uses only numpy and Pillow and imports nothing from edgebuild: its source is
# copied verbatim into every bundle's infer.py, so training, validation, calibration and the
# device all run exactly the same code.
import numpy as np
from PIL import Image, ImageOps

# The only formats ever decoded, all in-process. Pillow would otherwise pick a decoder from the
# file's content whatever its name: PostScript in a ".png" runs Ghostscript, and some rarely
# used formats raise exceptions nobody expects.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


def open_image(fp):
    """Image.open limited to FORMATS (anything else raises PIL.UnidentifiedImageError)."""
    Image.init()  # registers every format's opener (a name not yet registered is a KeyError)
    return Image.open(fp, formats=FORMATS)


def to_mode(img, color):
    """Decode any Pillow mode (palette, RGBA, 16-bit, CMYK, ...) to 'L' or 'RGB'."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite transparent pixels over white, the way viewers show them
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if color == "grayscale" else "RGB"
    return img if img.mode == target else img.convert(target)


def bilinear(img, width, height):
    """Pillow's antialiased bilinear resize, done as two explicit passes (width, then height;
    8-bit rounding between them), so every Pillow version and the C++ stub give the same bytes
    (a one-call resize may pick either pass order)."""
    if img.size[0] != width:
        img = img.resize((width, img.size[1]), Image.BILINEAR)
    if img.size[1] != height:
        img = img.resize((width, height), Image.BILINEAR)
    return img


def resize(img, height, width, mode):
    """stretch: to exactly HxW; letterbox: fit inside, pad with black, centred;
    center-crop: scale the short side to fit, then crop the centre."""
    w0, h0 = img.size
    if mode == "stretch":
        return bilinear(img, width, height)
    if mode == "letterbox":
        scale = min(width / w0, height / h0)
        nw, nh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        inner = bilinear(img, nw, nh)
        canvas = Image.new(img.mode, (width, height), 0)
        canvas.paste(inner, ((width - nw) // 2, (height - nh) // 2))
        return canvas
    if mode == "center-crop":
        scale = max(width / w0, height / h0)
        nw, nh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
        img = bilinear(img, nw, nh)
        left, top = (nw - width) // 2, (nh - height) // 2
        return img.crop((left, top, left + width, top + height))
    raise ValueError("unknown resize mode: " + str(mode))


def decode(img, input_size, color, resize_mode):
    """PIL image -> uint8 array of shape (H, W, C): mode conversion and resize, before any
    float arithmetic (what the build's image store keeps on disk)."""
    height, width = int(input_size[0]), int(input_size[1])
    arr = np.asarray(resize(to_mode(img, color), height, width, resize_mode), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalize(arr, color, mean, std):
    """uint8 (H, W, C) or a batch (N, H, W, C) -> float32 (C, H, W) or (N, C, H, W),
    normalised as (x/255 - mean) / std. color 'bgr' gives channels in B, G, R order."""
    arr = np.asarray(arr, dtype=np.float32) / np.float32(255.0)
    if color == "bgr":
        arr = arr[..., ::-1]
    mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    std = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
    arr = (arr - mean) / std
    return np.ascontiguousarray(np.moveaxis(arr, -1, -3), dtype=np.float32)


def preprocess(img, input_size, color, resize_mode, mean, std):
    """PIL image -> float32 array of shape (C, H, W): decode, then normalize."""
    return normalize(decode(img, input_size, color, resize_mode), color, mean, std)


def load_image(path, input_size, color, resize_mode, mean, std):
    with open_image(path) as img:
        img.load()
        return preprocess(img, input_size, color, resize_mode, mean, std)
