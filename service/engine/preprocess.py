"""The ONE preprocessing path, used for scoring and for fitting, so served scores match fitted ones.

Two stages: on the CPU, :meth:`Preprocessor.pixels` turns a decoded image into a ``C x H x W`` ``uint8`` tensor
(convert to ``L``/``RGB`` by the mode rules of :mod:`service.engine.decode`: 16-bit range scaled, alpha onto black,
CMYK/palette to RGB; then bilinear resize, center crop); on the model's device, :meth:`Preprocessor.normalize`
turns a stacked ``uint8`` batch into ``(x / 255 - mean) / std``. Tensors of images already in [0, 1] (the
embedded data sets) enter the same path through :meth:`Preprocessor.pixels_from_tensor` (quantized to 8 bits
exactly as a PNG of them would be).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from service.engine.decode import to_model_mode
from service.settings import PreprocessConfig, Size


class Preprocessor:
    """Turns images into network input of size ``input_size`` (height, width)."""

    def __init__(self, config: PreprocessConfig, input_size: Size) -> None:
        self.config = config
        self.input_size = input_size
        self.channels = 1 if config.mode == "L" else 3
        self._mean = torch.tensor(config.mean, dtype=torch.float32).reshape(-1, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).reshape(-1, 1, 1)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _resize_size(self) -> Size:
        return self.config.resize if self.config.resize is not None else self.input_size

    def pixels(self, image: Image.Image) -> Tensor:
        """Decoded image (any mode) -> ``C x H x W`` uint8 at the model's input size (a view of ``H x W x C``
        memory)."""
        image = to_model_mode(image, self.config.mode)
        height, width = self._resize_size()
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.config.crop is not None:
            ch, cw = self.config.crop
            left, top = (width - cw) // 2, (height - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
        # H x W x C as Pillow stores it, seen as C x H x W (channels-last strides: no transposing copy here; the
        # batch stack lays it out as the network runs)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensor = pixels.view(image.height, image.width, self.channels).permute(2, 0, 1)
        if tuple(tensor.shape[1:]) != tuple(self.input_size):
            raise ValueError(f"preprocessing yields {tuple(tensor.shape[1:])}, model expects {self.input_size}")
        return tensor

    def pixels_from_tensor(self, images: Tensor) -> list[Tensor]:
        """``N x C x H x W`` float images in [0, 1] -> per-image uint8 tensors through :meth:`pixels`."""
        quantized = (images.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()
        out = []
        for img in quantized:
            array = img.permute(1, 2, 0).numpy()
            mode = "L" if array.shape[2] == 1 else "RGB"
            out.append(self.pixels(Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)))
        return out

    def normalize(self, batch: Tensor) -> Tensor:
        """``B x C x H x W`` uint8 (on any device) -> float32 ``(x / 255 - mean) / std`` on the same device."""
        stats = self._stats.get(batch.device)
        if stats is None:
            stats = (self._mean.to(batch.device), self._std.to(batch.device))
            self._stats[batch.device] = stats
        mean, std = stats
        return (batch.float() / 255.0 - mean) / std

    @staticmethod
    def resize_map(scores: Tensor, size: tuple[int, int]) -> Tensor:
        """``H x W`` score map -> ``size`` (height, width), bilinear."""
        if tuple(scores.shape[-2:]) == tuple(size):
            return scores
        return F.interpolate(scores[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
