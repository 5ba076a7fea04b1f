"""The reward servers' HTTP wire format, for clients outside Ray: JSON with base64 PNG or .npy
images -- decoded with `allow_pickle=False`, never unpickled -- and scores (null where not finite) plus,
on request, base64 .npy gradients. Network data meets only two decoders: numpy's .npy reader and
Pillow's PNG plugin (1- and 8-bit modes); a request's body size is bounded before it is read, and its
pixel count from the PNG headers before they are decoded; a .npy array is read only once its header
shows that it fits in the bytes that carried it (numpy allocates what the header claims before it reads
the data)."""

from __future__ import annotations

import asyncio
import base64
import io
import math
from typing import Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .protocol import RewardInputError


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # ("grad": "yes" is refused, as a misspelt key is)

    prompts: list[str]
    images_npy: Optional[str] = None  # base64 of one .npy: float [B, 3, H, W] in [0, 1] or uint8 [B, 3, H, W]
    images_png: list[str] = Field(default_factory=list)  # base64 PNG (RGB) per image
    grad: bool = False  # also return d score / d image (as base64 .npy)


def encode_request(images: torch.Tensor | None = None, prompts: Sequence[str] = (), png: Sequence[bytes] = (),
                   grad: bool = False) -> dict:
    """The JSON body of a POST /score request (images as .npy, or PNG files' bytes)."""
    body: dict = {"prompts": list(prompts), "grad": grad}
    if images is not None:
        images = images.detach().cpu()
        if images.dtype == torch.bfloat16:  # numpy has no bfloat16 (float16 it has: sent as it is, half the bytes)
            images = images.float()
        body["images_npy"] = _b64_npy(images.numpy())
    body["images_png"] = [base64.b64encode(data).decode() for data in png]
    return body


PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # 1 or 8 bits per channel: RGB then /255 maps them onto [0, 1]


def decode_images(request: ScoreRequest, max_pixels: int = 2**24) -> torch.Tensor:
    """Float images [B, 3, H, W] in [0, 1]; `max_pixels` bounds B x H x W (a RewardInputError above it)."""
    if (request.images_npy is None) == (not request.images_png):
        raise RewardInputError("give the images either as images_npy or as images_png, exactly one of them")
    if request.images_npy is not None:
        try:
            array = load_npy(base64.b64decode(request.images_npy))
        except Exception as err:  # noqa: BLE001 - any malformed payload is the client's error
            raise RewardInputError(f"images_npy is not a base64 .npy array ({err})") from err
        _check_pixels(array.size // 3, max_pixels)  # values / 3 channels (the shape is checked later)
        if array.dtype == np.uint8:
            return torch.from_numpy(array.astype(np.float32) / 255.0)
        if array.dtype.kind != "f":
            raise RewardInputError(f"images_npy must be float (values in [0, 1]) or uint8, got dtype {array.dtype}")
        return torch.from_numpy(array.astype(np.float32))
    from PIL import Image

    images, pixels = [], 0
    for i, data in enumerate(request.images_png):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data)), formats=["PNG"])  # reads the header only
        except Exception as err:  # noqa: BLE001
            raise RewardInputError(f"images_png[{i}] is not a PNG image ({err})") from err
        if image.mode not in PNG_MODES:
            raise RewardInputError(f"images_png[{i}] has mode {image.mode!r}; send 8-bit PNGs ({', '.join(PNG_MODES)}), "
                                   f"or float values in [0, 1] as images_npy")
        pixels += image.width * image.height
        _check_pixels(pixels, max_pixels)
        try:
            image.load()
        except Exception as err:  # noqa: BLE001
            raise RewardInputError(f"images_png[{i}] is not a readable PNG ({err})") from err
        images.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1))
    if len({tuple(im.shape) for im in images}) > 1:
        raise RewardInputError("images_png must all have the same size")
    return torch.stack(images)


def max_body_bytes(max_pixels: int) -> int:
    """The largest request body worth reading for `max_pixels`: base64 (4/3) of float64 .npy images (3 x 8
    bytes a pixel), plus room for the prompts. A larger body is refused before it is read whole."""
    return max_pixels * 32 + 2**20


def check_declared_size(request, max_bytes: int) -> None:
    """413 for a request whose Content-Length is larger than `max_bytes`, from its headers alone: called
    before the request waits for anything, so one refused for its size holds nothing."""
    from fastapi import HTTPException

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(status_code=413, detail=_too_large(max_bytes))


async def read_body(request, max_bytes: int, deadline_s: float) -> bytes:
    """A request's body, refused (413) once more than `max_bytes` have streamed in (a body sent without a
    Content-Length, or longer than it said), or (408) when it has not arrived whole within `deadline_s`: a
    client that sends slowly would otherwise hold one of a replica's few HTTP slots for as long as it likes."""
    from fastapi import HTTPException

    async def streamed() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(status_code=413, detail=_too_large(max_bytes))
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(streamed(), deadline_s)
    except asyncio.TimeoutError:
        raise HTTPException(status_code=408, detail=f"the request body did not arrive within {deadline_s:g} s: send it "
                                                    "faster, or fewer or smaller images per request") from None


def _too_large(max_bytes: int) -> str:
    return (f"the request body is larger than {max_bytes:,} bytes (what rewards[].serve.http_max_pixels allows): send "
            "fewer or smaller images per request")


def _check_pixels(pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise RewardInputError(f"the request carries more than {max_pixels:,} pixels (images x height x width); send "
                               f"fewer or smaller images per request, or raise rewards[].serve.http_max_pixels")


def encode_answer(answer: dict) -> dict:
    scores = answer["scores"].tolist()
    body = {"scores": [s if np.isfinite(s) else None for s in scores]}
    if "grads" in answer:
        body["grads_npy"] = _b64_npy(answer["grads"].numpy())
    return body


def decode_answer(body: dict) -> dict[str, torch.Tensor]:
    answer = {"scores": torch.tensor([float("nan") if s is None else s for s in body["scores"]], dtype=torch.float32)}
    if "grads_npy" in body:
        answer["grads"] = torch.from_numpy(load_npy(base64.b64decode(body["grads_npy"])))
    return answer


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npy(data: bytes) -> np.ndarray:
    """The array of one .npy file's bytes, never unpickled, and no larger than those bytes: a header that
    claims more (a few bytes asking numpy for gigabytes) is refused before anything is allocated."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    read_header = NPY_HEADER_READERS.get(version)
    if read_header is None:
        raise ValueError(f".npy format version {version[0]}.{version[1]}: send 1.0 or 2.0 (what numpy.save writes)")
    shape, _, dtype = read_header(buffer)
    if math.prod(shape) * dtype.itemsize > len(data) - buffer.tell():
        raise ValueError(f"its header claims {shape} {dtype} values, more than the {len(data):,} bytes sent hold")
    buffer.seek(0)
    return np.load(buffer, allow_pickle=False)


def _b64_npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()
