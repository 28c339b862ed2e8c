"""Images in conversations: references, lazy loading, checks, and how a model turns one into tokens.

A conversation names its images by reference (a file path, or a `data:` URL) in the order their
`<image>` placeholders appear in its messages. Nothing is decoded while data is read or tokenized:
only an image's header (its size) is opened, because a model whose image token count depends on the
size (Qwen2-VL, Idefics3) needs it to know the sample's length. Pixels are decoded when a training
batch or a chat prompt is built, so 100k images never sit in memory.

`ImageTokens` is what the data side needs from a vision-language model: which token id marks an
image in the tokenized text and what ids that one token becomes for an image of a given size.
The model side (lmtune.models.vision) builds it from the model's processor.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from lmtune.errors import UserError

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in message text, in every data format
# Marks a chat template lmtune exported for a composed LLaVA: it takes image content parts (for plain
# transformers users) and LLaVA-style text alike, so lmtune itself passes text to it.
PARTS_MARK = "{#- lmtune: image parts render as <image> -#}"


# --------------------------------------------------------------------------- references


def is_data_url(ref: str) -> bool:
    return ref.startswith("data:")


def resolve_ref(ref, folder: Optional[Path], where: str) -> str:
    """An image reference made absolute: data: URLs stay, relative paths join `folder`."""
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(f"an image reference must be a non-empty string, got {ref!r}", where=where)
    if is_data_url(ref):
        return ref
    if ref.startswith(("http://", "https://")):
        raise UserError(f"image '{ref}' is a remote URL; training data must name local files", where=where,
                        hint="download the images and point image_folder at them")
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    path = Path(os.path.expanduser(ref))
    if not path.is_absolute() and folder is not None:
        path = Path(folder) / path
    return str(path)


def _data_url_bytes(ref: str) -> bytes:
    head, sep, payload = ref.partition(",")
    if not sep or ";base64" not in head:
        raise ValueError("a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data: URL's base64 payload is malformed") from None


def _open(ref: str):
    from PIL import Image

    if is_data_url(ref):
        return Image.open(io.BytesIO(_data_url_bytes(ref)))
    return Image.open(ref)


def _name(ref: str) -> str:
    return f"{ref[:40]}…" if is_data_url(ref) else ref


def _problem(ref: str, e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "the file does not exist"
    if isinstance(e, IsADirectoryError):
        return "it is a folder, not an image"
    if isinstance(e, PermissionError):
        return "it cannot be read (permission denied)"
    return str(e) or type(e).__name__


def image_size(ref: str, where: str = "") -> tuple[int, int]:
    """(width, height) from the image's header (no pixels are decoded)."""
    try:
        with _open(ref) as img:
            return img.size
    except Exception as e:  # PIL raises several types for unreadable files
        raise UserError(f"image '{_name(ref)}' cannot be read: {_problem(ref, e)}", where=where or None,
                        hint="fix or remove the record; `lmtune data check CONFIG` lists every bad image") from None


def load_image(ref: str, where: str = ""):
    """The decoded image as RGB (a PIL image)."""
    try:
        with _open(ref) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:
        raise UserError(f"image '{_name(ref)}' cannot be read: {_problem(ref, e)}", where=where or None,
                        hint="fix or remove the record; `lmtune data check CONFIG` lists every bad image") from None


def check_image(ref: str) -> Optional[str]:
    """None if the image decodes completely, else what is wrong (for `lmtune data check`)."""
    try:
        with _open(ref) as img:
            img.load()  # decodes every pixel: finds truncated files that a header read misses
    except Exception as e:
        return _problem(ref, e)
    return None


# --------------------------------------------------------------------------- the model's image tokens


@dataclass
class ImageTokens:
    """How a vision-language model writes images in its token stream.

    image_token_id   the token that marks one image in tokenized text (before expansion)
    placeholder      the text that stands for one image in the model's prompt format (replaces
                     `<image>` in message text unless the template renders image parts itself)
    expand           (width, height) -> the ids that replace one image token; for most models a
                     run of image tokens, one per feature the vision tower produces
    size_dependent   whether `expand` depends on the size (else it is computed once)
    fingerprint      names everything `expand` depends on (for the data cache key)
    """

    image_token_id: int
    placeholder: str
    expand: Callable[[tuple[int, int]], list[int]]
    size_dependent: bool = True
    fingerprint: str = ""
    _memo: dict = field(default_factory=dict, repr=False)

    def ids_for(self, ref: str, where: str = "") -> list[int]:
        size = image_size(ref, where)  # also the existence / readability check
        key = size if self.size_dependent else None
        if key not in self._memo:
            self._memo[key] = list(self.expand(size))
        return self._memo[key]
