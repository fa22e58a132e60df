"""Score parity with pytorch-ood 0.4.0: every detector in both libraries on the same seeded network and data.

For each case of :data:`bench.parity_cases.CASES` both libraries build the detector from the same trained
network (:func:`bench.parity_cases.train`), fit it with ``fit(loader)`` on the same ID images and score the same
test set (200 ID images, 100 near-OOD, 100 uniform noise) with ``predict(x)``; the global RNG is re-seeded
before each library's fit and scoring (MCD's dropout masks). Reported per detector: the Spearman rank
correlation of the two score vectors and both AUROCs (OOD positive, scikit-learn's ``roc_auc_score``, so neither
library's metric code is involved). A detector matches when Spearman >= 0.999 and |AUROC difference| <= 0.002;
one that does not must have a documented reason (``Case.reason``, mirrored in ``docs/parity.md``), else the
script exits with status 1. The metrics themselves are compared too: both libraries' ``OODMetrics`` on our
scores of every detector.

pytorch-ood is not a dependency: it is installed in ``build/pood`` (``pip install --no-deps --target build/pood
pytorch-ood==0.4.0``) and put on ``sys.path`` here only. Run ``.venv/bin/python bench/parity.py`` (about a
minute on 2 cores); ``--doc docs/parity.md`` rewrites the generated table there. JSON goes to
``bench/results/parity-<time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.parity_cases import CASES, SEED, Case, Data, TinyNet, make_data, make_nets, train  # noqa: E402

MIN_SPEARMAN = 0.999
MAX_AUROC_DIFF = 0.002
METRIC_KEYS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR")
START, END = "<!-- parity-table:start -->", "<!-- parity-table:end -->"


def import_pood(path: Path) -> tuple[ModuleType, ModuleType]:
    """pytorch-ood's ``detector`` and ``metrics`` modules, from ``path`` only."""
    sys.path.insert(0, str(path))
    import pytorch_ood.detector as pood_detector
    import pytorch_ood.metrics as pood_metrics

    return pood_detector, pood_metrics


def fit_labels(data: Data, noise: float) -> Tensor:
    """The fit labels with a seeded share ``noise`` of them replaced by random classes."""
    if noise == 0:
        return data.fit_y
    g = torch.Generator().manual_seed(SEED + 2)
    flip = torch.rand(len(data.fit_y), generator=g) < noise
    return torch.where(flip, torch.randint(0, int(data.fit_y.max()) + 1, data.fit_y.shape, generator=g), data.fit_y)


def scores_of(lib: ModuleType, case: Case, data: Data, net: TinyNet, ours: bool) -> tuple[Tensor, float]:
    """Build, fit and score one detector of one library on a fresh copy of ``net`` (a detector may leave hooks or
    modes behind); returns the scores and the seconds it took."""
    nets = make_nets(copy.deepcopy(net))
    make = case.ours if ours and case.ours is not None else case.make
    start = time.perf_counter()
    torch.manual_seed(SEED)
    det = make(lib, nets)
    if case.fit:
        loader = DataLoader(TensorDataset(data.fit_x, fit_labels(data, case.label_noise)), batch_size=100)
        det = det.fit(loader) or det
    torch.manual_seed(SEED)
    batches = data.test_x.split(case.batch_size)
    scores = torch.cat([det.predict(x).detach().reshape(len(x)) for x in batches])
    return scores.float().cpu(), time.perf_counter() - start


def compare(ours: Tensor, theirs: Tensor, labels: Tensor) -> dict[str, Any]:
    is_ood = (labels < 0).numpy()
    finite = bool(torch.isfinite(ours).all() and torch.isfinite(theirs).all())
    rho = float(spearmanr(ours.numpy(), theirs.numpy()).statistic) if finite else math.nan
    auroc_ours, auroc_theirs = (float(roc_auc_score(is_ood, s.nan_to_num().numpy())) for s in (ours, theirs))
    matches = rho >= MIN_SPEARMAN and abs(auroc_ours - auroc_theirs) <= MAX_AUROC_DIFF
    return {"spearman": rho, "auroc_ours": auroc_ours, "auroc_pood": auroc_theirs, "matches": matches}


def metric_parity(ours_metrics: Any, pood_metrics: ModuleType, scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Both libraries' ``OODMetrics`` on the same scores: ``{metric: ours - pytorch-ood}``."""
    a = ours_metrics.OODMetrics().update(scores, labels).compute()
    b = pood_metrics.OODMetrics().update(scores, labels).compute()
    return {k: float(a[k]) - float(b[k]) for k in METRIC_KEYS}


def run(pood_path: Path, only: set[str] | None) -> dict[str, Any]:
    from ood_core import detector as ours_detector
    from ood_core import metrics as ours_metrics

    pood_detector, pood_metrics = import_pood(pood_path)
    data = make_data()
    net = train(data)
    rows, metric_rows = [], []
    for case in CASES:
        if only and case.name not in only:
            continue
        row: dict[str, Any] = {"detector": case.name, "reason": case.reason, "note": case.note}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours, row["seconds_ours"] = scores_of(ours_detector, case, data, net, ours=True)
                theirs, row["seconds_pood"] = scores_of(pood_detector, case, data, net, ours=False)
        except Exception as exc:  # a case that cannot run in one library is reported, not fatal
            row |= {"error": f"{type(exc).__name__}: {exc}", "matches": False}
            rows.append(row)
            print(f"{case.name:24s} ERROR {row['error']}", flush=True)
            continue
        row |= compare(ours, theirs, data.test_y)
        if torch.isfinite(ours).all():
            metric_rows.append({"detector": case.name} | metric_parity(ours_metrics, pood_metrics, ours, data.test_y))
        rows.append(row)
        print(
            f"{case.name:24s} spearman {row['spearman']:.6f}  AUROC ours {row['auroc_ours']:.4f} "
            f"pood {row['auroc_pood']:.4f}  {'ok' if row['matches'] else 'DIFFERS'}",
            flush=True,
        )
    return {
        "torch": torch.__version__.split("+")[0],
        "seed": SEED,
        "criteria": {"min_spearman": MIN_SPEARMAN, "max_auroc_diff": MAX_AUROC_DIFF},
        "test_set": {"id": int((data.test_y >= 0).sum()), "ood": int((data.test_y < 0).sum())},
        "rows": rows,
        "metrics": metric_rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| Detector | Spearman | AUROC ours | AUROC pytorch-ood | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['detector']} | - | - | - | error: {r['error']} |")
            continue
        verdict = "match" if r["matches"] else ("differs: see below" if r["reason"] else "**DIFFERS**")
        lines.append(
            f"| {r['detector']} | {r['spearman']:.5f} | {r['auroc_ours']:.4f} | {r['auroc_pood']:.4f} | {verdict} |"
        )
    worst = {k: max((abs(m[k]) for m in report["metrics"]), default=0.0) for k in METRIC_KEYS}
    lines += [
        "",
        "Largest |ours - pytorch-ood| of `OODMetrics` on the same scores (over all detectors above): "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        + ".",
    ]
    return "\n".join(lines)


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pood-path", type=Path, default=ROOT / "build" / "pood")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: tiny ops gain nothing from more on a busy machine)"
    )
    parser.add_argument("--doc", type=Path, default=None, help="rewrite the generated table in this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = run(args.pood_path, {s for s in args.only.split(",") if s} or None)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = ROOT / "bench" / "results" / f"parity-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    print("\n" + table)
    if args.doc is not None:
        write_doc(args.doc, table)
    print(f"\n{report['seconds']} s; wrote {out.relative_to(ROOT)}")
    undocumented = [r["detector"] for r in report["rows"] if not r["matches"] and not r["reason"]]
    if undocumented:
        print("differences without a documented reason: " + ", ".join(undocumented))
        sys.exit(1)


if __name__ == "__main__":
    main()
