import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from ood_core.api import Detector, RequiresFitException
from ood_core.detector import Gram
from ood_core.detector.gram import deviation, gram_vectors
from ood_core.fit_checkpoint import load_fit_checkpoint, save_fit_checkpoint
from ood_core.state import load_detector, save_detector

from .common import assert_roundtrip
from .synthetic import CLASSES, maps_head, separable_maps

IDENTITY = nn.Identity()


def test_gram_vectors_are_the_rooted_row_sums_of_the_gram_matrices() -> None:
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # B=1, D=2 channels, H=1, W=2
    # p = 1: F F^T = [[5, 1], [1, 10]] -> row sums [6, 11]; p = 2: F^2 = [[1, 4], [9, 1]],
    # F^2 F^2^T = [[17, 13], [13, 82]] -> row sums [30, 95] -> square roots
    g = gram_vectors(f, [1, 2])
    torch.testing.assert_close(g, torch.tensor([[[6.0, 11.0]], [[math.sqrt(30), math.sqrt(95)]]], dtype=torch.float64))
    # an odd pole keeps the sign: F^3 = [-8, 1] (HW = 1), row sums -8 * (-7) = 56 and 1 * (-7) = -7
    neg = torch.tensor([[[[-2.0]], [[1.0]]]])
    torch.testing.assert_close(
        gram_vectors(neg, [3])[0, 0], torch.tensor([56 ** (1 / 3), -(7 ** (1 / 3))], dtype=torch.float64)
    )


def test_deviation_is_relative_to_the_violated_bound() -> None:
    g = torch.tensor([[0.0, 5.0, 1.5]])
    mins, maxs = torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[2.0, 4.0, 2.0]])
    torch.testing.assert_close(deviation(g, mins, maxs), torch.tensor([1 / (1 + 1e-6) + 1 / (4 + 1e-6)]))


def hand_fit() -> Gram:
    # B x D features count as maps with HW = 1: g = f * sum(f) for p = 1
    z = torch.tensor([[1.0, 1.0], [2.0, 1.0], [0.0, 1.0], [0.0, 2.0], [9.0, 9.0]])
    y = torch.tensor([0, 0, 1, 1, -1])  # the OOD row is ignored
    return Gram(IDENTITY, None, num_classes=2, num_poles_list=[1]).fit_features([z], y)


def test_score_on_a_hand_computed_case() -> None:
    det = hand_fit()
    # class 0: g = [2, 2], [6, 3]; class 1: g = [0, 1], [0, 4]; fewer than 10 samples: nothing held out
    assert det.mins[0, 0].tolist() == [[2.0, 2.0], [0.0, 1.0]]
    assert det.maxs[0, 0].tolist() == [[6.0, 3.0], [0.0, 4.0]]
    assert det.layer_norm.tolist() == [1.0]
    # f = [3, 0]: head = identity -> class 0; g = [9, 0]: (9 - 6) / 6 above, (2 - 0) / 2 below
    z = torch.tensor([[3.0, 0.0], [1.5, 1.0]])
    expected = torch.tensor([3 / (6 + 1e-6) + 2 / (2 + 1e-6), 0.0])  # [1.5, 1] gives g = [3.75, 2.5]: in bounds
    torch.testing.assert_close(det.predict_features([z]), expected)
    # predict_structured takes the logits from elsewhere: class 1's bounds
    other = det.predict_structured(torch.tensor([[0.0, 1.0]]), [z[:1]])
    torch.testing.assert_close(other, torch.tensor([9 / (0 + 1e-6) + 0.0 + (1 - 0) / (1 + 1e-6)]))


def test_expected_deviation_is_the_mean_over_the_held_out_samples() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.rand(400, 3, generator=g) + torch.arange(400).remainder(2)[:, None].float()
    y = torch.arange(400) % 2
    det = Gram(IDENTITY, None, 2, [1, 2]).fit_features([z], y)
    held = det._held_out(z)
    assert 20 < int(held.sum()) < 70  # about 10% of 400
    gv = gram_vectors(z, [1, 2])
    mins = torch.stack([gv[:, ~held & (y == c)].amin(1) for c in range(2)], dim=1)
    maxs = torch.stack([gv[:, ~held & (y == c)].amax(1) for c in range(2)], dim=1)
    torch.testing.assert_close(det.mins[0], mins)
    torch.testing.assert_close(det.maxs[0], maxs)
    dev = deviation(gv[:, held], mins[:, y[held]], maxs[:, y[held]]).sum(0)
    torch.testing.assert_close(det.layer_norm, dev.mean().reshape(1))


def separable_layers(n: int = 64, seed: int = 0) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    id_maps, y, ood_maps = separable_maps(n, seed)
    return [id_maps, torch.relu(id_maps)], y, [ood_maps, torch.relu(ood_maps)]


def test_ood_scores_higher_on_separable_maps() -> None:
    fit, y, _ = separable_layers(200, seed=0)
    test, _, ood = separable_layers(64, seed=1)
    det = Gram(maps_head(), None, CLASSES).fit_features(fit, y)
    id_scores, ood_scores = det.predict_features(test), det.predict_features(ood)
    assert id_scores.max() < ood_scores.min()


def test_predict_runs_the_layers_in_turn_and_the_head_on_the_last() -> None:
    fit, y, _ = separable_layers(120)
    layers = [nn.Identity(), nn.ReLU()]
    det = Gram(maps_head(), layers, CLASSES).fit(list(zip(fit[0].split(30), y.split(30), strict=True)))
    torch.testing.assert_close(det.predict(fit[0][:5]), det.predict_features([fit[0][:5], fit[1][:5]]))
    assert det.num_layers == 2 and det.poles(2) == [1, 2]


def test_needs_a_fit_and_every_class() -> None:
    fit, y, _ = separable_layers(40)
    with pytest.raises(RequiresFitException):
        Gram(maps_head(), None, CLASSES).predict_features(fit)
    with pytest.raises(ValueError, match="class"):
        Gram(maps_head(), None, CLASSES + 1).fit_features(fit, y)
    with pytest.raises(ValueError, match="num_classes"):
        Gram(maps_head(), None, CLASSES - 1).fit_features(fit, y)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    fit, y, ood = separable_layers(80)
    det = Gram(maps_head(), None, CLASSES, [1, 3]).fit_features(fit, y)
    loaded = assert_roundtrip(det, ood, tmp_path, head=maps_head(), feature_layers=None)
    assert loaded.hparams() == {"num_classes": CLASSES, "num_poles_list": [1, 3]}
    with pytest.raises(ValueError, match="num_poles_list"):
        Gram(maps_head(), None, CLASSES, [0])


def test_shards_merged_in_both_passes_and_a_resumed_fit_equal_one_stream() -> None:
    fit, y, ood = separable_layers(240)
    batches = [([layer[i : i + 20] for layer in fit], y[i : i + 20]) for i in range(0, 240, 20)]
    make = lambda: Gram(maps_head(), None, CLASSES)  # noqa: E731
    stream = make().fit_features(fit, y)
    merged = make().begin_fit()
    for _ in range(2):
        shards = []
        for part in (batches[0::3], batches[1::3], batches[2::3]):
            worker: Detector = make().begin_fit()
            if merged.fit_pass == 1:  # a second-pass worker holds the first pass's result (as after a broadcast)
                worker = load_fit_checkpoint(save_fit_checkpoint(merged))[0]
            for z, labels in part:
                worker.partial_fit_features(z, labels)
            shards.append(load(save(worker.fit_statistics())))
        for stats in reversed(shards):
            merged.merge_fit_statistics(stats)
        done = merged.finish_pass()
    assert done
    resumed: Detector = make().begin_fit()
    for z, labels in batches:
        resumed.partial_fit_features(z, labels)
    assert not resumed.finish_pass()
    for z, labels in batches[:5]:
        resumed.partial_fit_features(z, labels)
    resumed, _ = load_fit_checkpoint(save_fit_checkpoint(resumed), head=maps_head())
    for z, labels in batches[5:]:
        resumed.partial_fit_features(z, labels)
    assert resumed.finish_pass()
    for other in (merged, resumed):
        assert isinstance(other, Gram)
        for name in Gram.state_spec:
            torch.testing.assert_close(getattr(other, name), getattr(stream, name), msg=name)
        torch.testing.assert_close(other.predict_features(ood), stream.predict_features(ood))


def test_a_tampered_state_is_refused() -> None:
    fit, y, _ = separable_layers(40)
    det = Gram(maps_head(), None, CLASSES).fit_features(fit, y)
    det.mins = det.maxs + 1
    with pytest.raises(ValueError, match="mins"):
        load_detector(save_detector(det), head=maps_head())
