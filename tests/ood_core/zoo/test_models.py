import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from ood_core.data import load_split
from ood_core.zoo import DIGITS_MEAN, DIGITS_STD, DigitsCNN, DigitsSegmenter, normalize


def test_normalize_standardizes_the_training_images() -> None:
    images, _ = load_split("train")
    normalized = normalize(images)
    assert abs(float(normalized.mean())) < 0.01 and abs(float(normalized.std()) - 1.0) < 0.01
    assert torch.allclose(normalize(torch.tensor([DIGITS_MEAN, DIGITS_MEAN + DIGITS_STD])), torch.tensor([0.0, 1.0]))


def test_classifier_forward_is_fc_of_pool_of_body() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(3, 1, 32, 32)
    maps = model.body(x)
    assert maps.shape == (3, DigitsCNN.feature_dim, 8, 8)
    assert torch.all(maps >= 0)  # post-ReLU features, as ReAct / ASH / SCALE expect
    logits = model(x)
    assert logits.shape == (3, 6)
    assert torch.allclose(logits, model.head_from_maps(maps))
    assert torch.allclose(logits, model.fc(model.pool(maps)))
    assert torch.allclose(model.pool(maps), maps.mean(dim=(2, 3)))


def test_classifier_dropout_is_random_in_train_mode_only() -> None:
    torch.manual_seed(0)
    model = DigitsCNN()
    x = torch.randn(4, 1, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_classifier_feature_extractor_nodes() -> None:
    model = DigitsCNN().eval()
    extractor = create_feature_extractor(model, {"body": "maps", "pool": "features", "fc": "logits"})
    x = torch.randn(2, 1, 32, 32)
    out = extractor(x)
    assert out["maps"].shape == (2, 64, 8, 8) and out["features"].shape == (2, 64)
    assert torch.allclose(out["logits"], model(x))
    assert torch.allclose(out["features"], model.pool(model.body(x)))


def test_segmenter_shapes_and_feature_extractor_nodes() -> None:
    model = DigitsSegmenter().eval()
    x = torch.randn(2, 1, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 7, 64, 64)
    extractor = create_feature_extractor(model, ["body", "head", "upsample"])
    out = extractor(x)
    assert out["body"].shape == (2, DigitsSegmenter.feature_dim, 16, 16)
    assert out["head"].shape == (2, 7, 16, 16)
    assert torch.allclose(out["upsample"], logits)


@pytest.mark.parametrize("num_classes", [3, 10])
def test_number_of_classes_is_configurable(num_classes: int) -> None:
    assert DigitsCNN(num_classes).eval()(torch.zeros(1, 1, 32, 32)).shape == (1, num_classes)
    assert DigitsSegmenter(num_classes).eval()(torch.zeros(1, 1, 32, 32)).shape == (1, num_classes, 32, 32)
