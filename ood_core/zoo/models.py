"""Small networks for the embedded digits benchmark (:mod:`ood_core.data`).

Both take NORMALIZED grayscale input ``x_norm = (x - DIGITS_MEAN) / DIGITS_STD`` (``x`` in [0, 1], see
:func:`normalize`). Their parts are named submodules so that
``torchvision.models.feature_extraction.create_feature_extractor`` can return them by name:

* :class:`DigitsCNN` (``1 x 32 x 32`` -> ``num_classes`` logits): ``body`` (conv stack -> ``B x 64 x 8 x 8``
  post-ReLU feature maps, ending with channel dropout), ``pool`` (global average pooling + flatten ->
  ``B x 64``), ``fc`` (linear -> logits). ``forward(x) = fc(pool(body(x)))``.
* :class:`DigitsSegmenter` (``1 x 64 x 64`` -> ``B x num_classes x 64 x 64`` logits; class 0 = background,
  1..6 = digits 0-5): ``body`` (conv stack, stride 4 -> ``B x 48 x 16 x 16``), ``head`` (1x1 conv -> logits),
  ``upsample`` (bilinear x4). ``forward(x) = upsample(head(body(x)))``.

The dropout layers (``nn.Dropout2d``) are active only in training mode, which is what Monte-Carlo dropout
(Gal & Ghahramani, ICML 2016) samples. There is no batch normalization, so ``model.train()`` changes nothing
but the dropout masks.
"""

from __future__ import annotations

from torch import Tensor, nn

DIGITS_MEAN: float = 0.3037
"""Mean pixel value of the digits ``train`` split (images in [0, 1])."""
DIGITS_STD: float = 0.3247
"""Standard deviation of the pixel values of the digits ``train`` split."""


def normalize(images: Tensor) -> Tensor:
    """``(images - DIGITS_MEAN) / DIGITS_STD``: the input both networks expect."""
    return (images - DIGITS_MEAN) / DIGITS_STD


def _conv_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation)
    return [conv, nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """A 4-layer CNN classifier for ``1 x 32 x 32`` digits; ``feature_dim`` = 64."""

    feature_dim = 64

    def __init__(self, num_classes: int = 6, dropout: float = 0.3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            *_conv_relu(1, 16),
            nn.MaxPool2d(2),
            *_conv_relu(16, 32),
            *_conv_relu(32, 32),
            nn.MaxPool2d(2),
            *_conv_relu(32, self.feature_dim),
            nn.Dropout2d(dropout),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def head_from_maps(self, maps: Tensor) -> Tensor:
        """Logits from ``B x 64 x H x W`` feature maps (the output of ``body``): ``fc(pool(maps))``."""
        return self.fc(self.pool(maps))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(x)))


class DigitsSegmenter(nn.Module):
    """A fully-convolutional segmenter (output stride 4, dilated convs, receptive field 43 px) for 64x64
    digit mosaics; input height and width must be multiples of 4."""

    feature_dim = 48

    def __init__(self, num_classes: int = 7, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            *_conv_relu(1, 16, stride=2),
            *_conv_relu(16, 32),
            *_conv_relu(32, 32, stride=2),
            *_conv_relu(32, self.feature_dim, dilation=2),
            *_conv_relu(self.feature_dim, self.feature_dim, dilation=2),
            nn.Dropout2d(dropout),
        )
        self.head = nn.Conv2d(self.feature_dim, num_classes, kernel_size=1)
        self.upsample = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample(self.head(self.body(x)))
