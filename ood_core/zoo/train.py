"""Train the zoo's networks on the embedded digits data and write their weights: ``python -m ood_core.zoo.train``.

Seeded and deterministic (``torch.use_deterministic_algorithms``): the same machine, thread count and library
versions give the same weights. Both networks train with Adam and cross-entropy on normalized inputs; the
classifier sees random translations of up to 2 pixels. The segmenter trains on ID-only mosaics of ``train``
digits (it never sees an OOD digit) with per-pixel cross-entropy over background + six digit classes.
Prints the classifier's accuracy on the ID ``test`` split and the segmenter's pixel accuracy on ID-only mosaics
of ``test`` digits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ood_core.data import load_split, make_mosaics
from ood_core.zoo.models import DigitsCNN, DigitsSegmenter, normalize
from ood_core.zoo.weights_io import CLASSIFIER_WEIGHTS, SEGMENTER_WEIGHTS, save_weights

SEED = 0


def random_translate(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by independent integer offsets in [-max_shift, max_shift] (zero fill)."""
    n, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])


def _train_epochs(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    max_shift: int = 0,
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            x = images[batch]
            if max_shift:
                x = random_translate(x, max_shift, generator)
            loss = F.cross_entropy(model(normalize(x)), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def classifier_accuracy(model: DigitsCNN, split: str = "test") -> float:
    """Top-1 accuracy of ``model`` on an ID split of the digits benchmark."""
    device = next(model.parameters()).device
    images, labels = load_split(split)
    predictions = model.eval()(normalize(images.to(device))).argmax(1).cpu()
    return float((predictions == labels).float().mean())


@torch.no_grad()
def segmenter_pixel_accuracy(model: DigitsSegmenter, n: int = 200) -> tuple[float, float]:
    """(pixel accuracy, foreground pixel accuracy) on ``n`` ID-only mosaics of ``test`` digits."""
    device = next(model.parameters()).device
    images, labels = make_mosaics(n, ood_share=0.0, seed=SEED, split="test")
    predictions = model.eval()(normalize(images.to(device))).argmax(1).cpu()
    correct = predictions == labels
    return float(correct.float().mean()), float(correct[labels > 0].float().mean())


def train_classifier(epochs: int = 30, seed: int = SEED) -> DigitsCNN:
    """Train a :class:`DigitsCNN` on the ID ``train`` split."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    images, labels = load_split("train", seed=seed)
    _train_epochs(model, images, labels, epochs, 32, 3e-3, torch.Generator().manual_seed(seed), max_shift=2)
    return model


def train_segmenter(epochs: int = 14, num_mosaics: int = 800, seed: int = SEED) -> DigitsSegmenter:
    """Train a :class:`DigitsSegmenter` on ID-only mosaics of ``train`` digits."""
    torch.manual_seed(seed)
    model = DigitsSegmenter()
    images, labels = make_mosaics(num_mosaics, ood_share=0.0, seed=seed, split="train")
    _train_epochs(model, images, labels, epochs, 16, 5e-3, torch.Generator().manual_seed(seed + 1))
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out-dir", type=Path, default=None, help="write the weights here instead of the package")
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--segmenter-epochs", type=int, default=14)
    parser.add_argument("--segmenter-mosaics", type=int, default=800, help="number of training mosaics")
    args = parser.parse_args(argv)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _train_and_save(args.out_dir, args.classifier_epochs, args.segmenter_epochs, args.segmenter_mosaics)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train_and_save(out_dir: Path | None, classifier_epochs: int, segmenter_epochs: int, num_mosaics: int) -> None:
    classifier_path = CLASSIFIER_WEIGHTS if out_dir is None else out_dir / CLASSIFIER_WEIGHTS.name
    segmenter_path = SEGMENTER_WEIGHTS if out_dir is None else out_dir / SEGMENTER_WEIGHTS.name

    start = time.perf_counter()
    classifier = train_classifier(classifier_epochs)
    save_weights(classifier, classifier_path)
    print(f"classifier: ID test accuracy {classifier_accuracy(classifier):.4f} ({time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    segmenter = train_segmenter(segmenter_epochs, num_mosaics)
    save_weights(segmenter, segmenter_path)
    pixel, foreground = segmenter_pixel_accuracy(segmenter)
    print(
        f"segmenter: pixel accuracy {pixel:.4f}, foreground pixel accuracy {foreground:.4f} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    print(f"wrote {classifier_path} and {segmenter_path}")


if __name__ == "__main__":
    main()
