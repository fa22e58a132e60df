"""GridSearch: picks the candidate with the best validation AUROC (checked against scikit-learn per candidate),
computes network outputs once, reports JSON rows, survives failing candidates, works with the network in the loop."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from ood_core.detector import KNN, ODIN, MaxSoftmax
from ood_core.metrics import AUROC, FPRAtTPR
from ood_core.search import GridSearch


def features(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """ID: two tight clusters; OOD: a shell in between, so small k separates best."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0]])
    fit_y = torch.randint(0, 2, (120,), generator=g)
    fit_z = centers[fit_y] + 0.4 * torch.randn(120, 3, generator=g)
    val_y = torch.cat([torch.randint(0, 2, (60,), generator=g), -torch.ones(40, dtype=torch.long)])
    val_z = torch.cat(
        [centers[val_y[:60]] + 0.4 * torch.randn(60, 3, generator=g), 1.5 * torch.randn(40, 3, generator=g)]
    )
    return (fit_z, fit_y), (val_z, val_y)


def test_best_candidate_is_the_argmax_of_the_per_candidate_auroc() -> None:
    fit, val = features()
    grid = {"k": [1, 10, 60], "normalize": [False, True]}
    search = GridSearch(KNN, fit, val, grid)
    best = search.run()
    expected = {}
    for row in search.results_:
        detector = KNN(None, **row["params"]).fit_features(*fit)
        expected[json.dumps(row["params"])] = roc_auc_score((val[1] < 0).numpy(), detector.predict_features(val[0]))
        assert row["score"] == pytest.approx(expected[json.dumps(row["params"])], abs=1e-12)
        assert row["error"] is None and set(row["metrics"]) >= {"AUROC", "FPR95TPR"}
    assert [r["params"] for r in search.results_] == [
        {"k": k, "normalize": n} for k in (1, 10, 60) for n in (False, True)
    ]
    winner = max(expected, key=lambda key: expected[key])
    assert best == json.loads(winner) == search.best_params_
    assert search.best_score_ == pytest.approx(expected[winner])
    assert isinstance(search.best_detector_, KNN) and search.best_detector_.is_fitted
    assert search.best_detector_.k == best["k"]
    report = json.loads(json.dumps(search.report(), allow_nan=False))  # strict JSON
    assert report["best"] == {"params": best, "score": search.best_score_}
    assert report["detector"] == "KNN" and report["metric"] == "AUROC" and len(report["results"]) == 6


def test_failing_candidates_get_an_error_row_and_the_rest_still_run() -> None:
    fit, val = features(1)
    search = GridSearch(KNN, fit, val, {"k": [0, 500, 5]})  # k=0 cannot be built; 500 > the 120 fit features
    assert search.run() == {"k": 5}
    errors = [row["error"] for row in search.results_]
    assert errors[0] is not None and "k" in errors[0] and errors[1] is not None and errors[2] is None
    assert search.results_[0]["score"] is None
    with pytest.raises(ValueError, match="no hyperparameter combination"):
        GridSearch(KNN, fit, val, {"k": [0, 500]}).run()


def test_lower_is_better_metrics_and_custom_metric_objects() -> None:
    fit, val = features(2)
    fpr = GridSearch(
        KNN, fit, val, {"k": [1, 60]}, metric=FPRAtTPR(0.9), metric_name="FPR90TPR", higher_is_better=False
    )
    best = fpr.run()
    scores = {row["params"]["k"]: row["score"] for row in fpr.results_}
    assert best == {"k": min(scores, key=lambda k: scores[k])}
    with pytest.raises(KeyError, match="AUTC"):
        GridSearch(KNN, fit, val, {"k": [1]}, metric=AUROC(), metric_name="AUTC").run()


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.linear(x)


def test_loaders_are_run_through_the_network_once_for_all_candidates() -> None:
    fit, val = features(3)
    net = CountingNet()
    fit_loader = list(zip(fit[0].split(32), fit[1].split(32), strict=True))  # 4 batches
    val_loader = list(zip(val[0].split(32), val[1].split(32), strict=True))  # 4 batches
    search = GridSearch(KNN, fit_loader, val_loader, {"k": [1, 3, 10, 30]}, modules={"model": net})
    search.run()
    assert net.calls == 8  # not 8 per candidate
    with torch.no_grad():
        outputs = GridSearch(KNN, (net(fit[0]), fit[1]), (net(val[0]), val[1]), {"k": [1, 3, 10, 30]})
        outputs.run()
    assert [r["score"] for r in search.results_] == pytest.approx([r["score"] for r in outputs.results_])


def test_an_instance_is_the_base_of_the_candidates_and_stays_unchanged() -> None:
    fit, val = features(4)
    base = KNN(None, k=7, normalize=False)
    search = GridSearch(base, fit, val, {"k": [1, 2]})
    search.run()
    assert search.best_detector_ is not None and search.best_detector_.normalize is False  # from base.hparams()
    assert base.k == 7 and not base.is_fitted


class SpacedKNN(KNN):
    hyperparameter_space: ClassVar[dict[str, list[Any]]] = {"k": [2, 4]}


def test_grid_defaults_to_the_detectors_hyperparameter_space_and_is_validated() -> None:
    fit, val = features(5)
    search = GridSearch(SpacedKNN, fit, val)
    search.run()
    assert [row["params"] for row in search.results_] == [{"k": 2}, {"k": 4}]
    with pytest.raises(ValueError, match="empty"):
        GridSearch(KNN, fit, val)
    with pytest.raises(ValueError, match="non-empty list"):
        GridSearch(KNN, fit, val, {"k": []})
    with pytest.raises(ValueError, match="JSON"):
        GridSearch(KNN, fit, val, {"k": [object()]})
    with pytest.raises(ValueError, match="fit_data"):
        GridSearch(KNN, None, val, {"k": [1]}).run()
    with pytest.raises(ValueError, match="ID .* and OOD"):
        GridSearch(KNN, fit, (val[0][:10], val[1][:10].abs()), {"k": [1]}).run()


def test_network_in_the_loop_detectors_run_on_the_loaders() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    _, val = features(6)
    val_loader = list(zip(val[0].split(25), val[1].split(25), strict=True))
    search = GridSearch(
        ODIN, None, val_loader, {"eps": [0.0, 0.01], "temperature": [1.0, 1000.0]}, modules={"model": model}
    )
    search.run()
    for row in search.results_:
        detector = ODIN(model, **row["params"])
        scores = torch.cat([detector.predict(x) for x, _ in val_loader])
        assert row["score"] == pytest.approx(roc_auc_score((val[1] < 0).numpy(), scores.detach().numpy()), abs=1e-9)
    with pytest.raises(ValueError, match="network in the loop"):
        GridSearch(ODIN, None, val, {"eps": [0.0]}, modules={"model": model}).run()


def test_detectors_without_a_fit_need_no_fit_data() -> None:
    _, (val_z, val_y) = features(7)
    search = GridSearch(MaxSoftmax, None, (val_z, val_y), {"t": [0.5, 2.0]})
    search.run()
    assert all(row["error"] is None for row in search.results_)
