"""Fit / predict time and fit peak memory of Mahalanobis, RMD, ViM and KNN against pytorch-ood 0.4.0.

Synthetic, seeded features: N ID samples of dimension D in C Gaussian classes (default 50,000 x 512, 100
classes) and a separate set of test points (default 10,000) for ``predict_features``. Both libraries get the
same float32 tensors. Times are medians of ``--repeats`` runs, ours and pytorch-ood alternating, the order
swapped at every repeat (the ratio of the minima is printed too: on a shared machine it is the least disturbed
by other processes). The load average at the start and the end is printed and stored.

Peak memory is the peak of live torch tensor storages created during ``fit(loader)`` (a
``TorchDispatchMode`` tracker; the loader's batches are views of the pre-built data set, which is not
counted), so it shows what the fit keeps, independent of allocator noise.

pytorch-ood is *not* a project dependency. Install it apart, for the benchmark only::

    .venv/bin/pip install --no-deps --target /tmp/pood pytorch-ood==0.4.0
    .venv/bin/python bench/detectors.py            # --pood-path /tmp/pood by default

Writes ``bench/results/detectors.json`` (git-ignored) and prints a table of ratios (pytorch-ood / ours:
above 1 means ours is faster / smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ood_core.detector import KNN, RMD, Mahalanobis, ViM  # noqa: E402


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created by torch ops inside the context (views of the storages in
    ``exclude``, e.g. the data set the loader slices, are not new memory and are not counted)."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0 or key in self.exclude:
                    continue
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def timed_pair(
    ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int
) -> tuple[list[float], list[float], Any, Any]:
    """Run ours and theirs alternately ``repeats`` times, swapping which goes first each time (so that load
    from other processes on a shared machine hits both alike); returns both lists of seconds and the last
    results."""
    times: tuple[list[float], list[float]] = ([], [])
    results: list[Any] = [None, None]
    for rep in range(repeats):
        order = ((0, ours), (1, theirs)) if rep % 2 == 0 else ((1, theirs), (0, ours))  # alternate who goes first
        for i, fn in order:
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return times[0], times[1], results[0], results[1]


def synthetic(n: int, dim: int, classes: int, n_test: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    scale = 0.5 + torch.rand(dim, generator=g)  # anisotropic noise
    y = torch.randint(0, classes, (n,), generator=g)
    y[:classes] = torch.arange(classes)
    x = centres[y] + scale * torch.randn(n, dim, generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    test = centres[y_test] + scale * torch.randn(n_test, dim, generator=g)
    test[n_test // 2 :] = 2.5 * torch.randn(n_test - n_test // 2, dim, generator=g)  # half OOD
    w = torch.randn(classes, dim, generator=g) / dim**0.5
    b = 0.1 * torch.randn(classes, generator=g)
    return {"x": x, "y": y, "test": test, "w": w, "b": b}


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Scores may differ by a constant factor (pytorch-ood: covariance not divided by N, factor 1/2)."""
    a, b = ours.double().flatten(), theirs.double().flatten()
    scale = float((a @ b) / (b @ b))
    return {"scale": scale, "max_rel_dev": float((a - scale * b).abs().max() / a.abs().max())}


def fit(make: Callable[[], Any], x: torch.Tensor, y: torch.Tensor) -> Any:
    return make().fit_features(x, y)


def loader(x: torch.Tensor, y: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(batch), y.split(batch), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--vim-d", type=int, default=64)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1000, help="loader batch size for the memory measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="limit torch and the BLAS / OpenMP pools to this many threads"
    )
    parser.add_argument("--only", default="", help="comma-separated detectors to time (default: all)")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure the fits' peak memory")
    parser.add_argument("--pood-path", default="/tmp/pood")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "detectors.json"))
    args = parser.parse_args()

    if args.threads > 0:  # torch's own pool, and the BLAS / OpenMP pools of scipy and scikit-learn
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    if Path(args.pood_path).is_dir():
        sys.path.insert(0, args.pood_path)
    try:
        import pytorch_ood.detector as pood
        from pytorch_ood import __version__ as pood_version
    except ImportError as exc:
        raise SystemExit(f"pytorch-ood not importable ({exc}); install it with --target {args.pood_path}") from exc

    data = synthetic(args.n, args.dim, args.classes, args.n_test)
    x, y, test, w, b = data["x"], data["y"], data["test"], data["w"], data["b"]
    ours: dict[str, Callable[[], Any]] = {
        "Mahalanobis": lambda: Mahalanobis(None),
        "RMD": lambda: RMD(None),
        "ViM": lambda: ViM(None, d=args.vim_d, w=w, b=b),
        "KNN": lambda: KNN(None, k=args.k),
    }
    theirs: dict[str, Callable[[], Any]] = {
        "Mahalanobis": lambda: pood.Mahalanobis(None),
        "RMD": lambda: pood.RMD(None),
        "ViM": lambda: pood.ViM(None, d=args.vim_d, w=w, b=b),
        "KNN": lambda: pood.KNN(None, k=args.k),
    }
    if args.only:
        unknown = set(args.only.split(",")) - set(ours)
        if unknown:
            raise SystemExit(f"unknown detectors {sorted(unknown)}; choose from {sorted(ours)}")
        ours = {name: make for name, make in ours.items() if name in args.only.split(",")}
    results: dict[str, Any] = {
        "config": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "load_average_start": os.getloadavg(),
        "pytorch_ood": pood_version,
        "detectors": {},
    }
    print(
        f"N={args.n} D={args.dim} C={args.classes} test={args.n_test}, median of {args.repeats}, "
        f"{torch.get_num_threads()} threads, pytorch-ood {pood_version}, load average {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'detector':<12}{'fit ours':>10}{'fit pood':>10}{'ratio':>7}{'pred ours':>11}{'pred pood':>11}{'ratio':>7}"
        f"{'fit min':>9}{'pred min':>9}"
    )
    print(header)
    for make in ours.values():  # warm-up (kernels, threads) of each selected detector
        make().fit_features(x[:2000], y[:2000]).predict_features(test[:100])
    for name in ours:
        row: dict[str, Any] = {}
        fit_ours, fit_pood, det, ref = timed_pair(
            partial(fit, ours[name], x, y), partial(fit, theirs[name], x, y), args.repeats
        )
        with torch.no_grad():
            pred_ours, pred_pood, s_ours, s_pood = timed_pair(
                partial(det.predict_features, test), partial(ref.predict_features, test), args.repeats
            )
        for key, times in (
            ("fit_ours", fit_ours),
            ("fit_pood", fit_pood),
            ("predict_ours", pred_ours),
            ("predict_pood", pred_pood),
        ):
            row[f"{key}_s"], row[f"{key}_min_s"], row[f"{key}_all_s"] = statistics.median(times), min(times), times
        row["fit_speedup"] = row["fit_pood_s"] / row["fit_ours_s"]
        row["predict_speedup"] = row["predict_pood_s"] / row["predict_ours_s"]
        row["fit_speedup_min"] = row["fit_pood_min_s"] / row["fit_ours_min_s"]
        row["predict_speedup_min"] = row["predict_pood_min_s"] / row["predict_ours_min_s"]
        row["agreement"] = agreement(s_ours, s_pood)
        results["detectors"][name] = row
        print(
            f"{name:<12}{row['fit_ours_s']:>10.3f}{row['fit_pood_s']:>10.3f}{row['fit_speedup']:>7.2f}"
            f"{row['predict_ours_s']:>11.3f}{row['predict_pood_s']:>11.3f}{row['predict_speedup']:>7.2f}"
            f"{row['fit_speedup_min']:>9.2f}{row['predict_speedup_min']:>9.2f}"
            f"   scores = {row['agreement']['scale']:.4g} x pood (max rel. dev. {row['agreement']['max_rel_dev']:.1e})"
        )

    results["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
    if not args.skip_memory:
        measure_memory(args, x, y, pood, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


def measure_memory(
    args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, pood: Any, results: dict[str, Any]
) -> None:
    """Peak tensor memory of the streaming Gaussian fits (ours and pytorch-ood's) over a loader."""
    print(
        f"\npeak tensor memory of fit(loader), batches of {args.batch}; data set = "
        f"{x.numel() * 4 / 2**20:.0f} MiB float32, D^2 float64 = {args.dim**2 * 8 / 2**20:.1f} MiB"
    )
    identity = torch.nn.Identity()
    memory: dict[str, Any] = {}
    for name, ctor in (
        ("Mahalanobis", lambda: Mahalanobis(identity)),
        ("RMD", lambda: RMD(identity)),
        ("pood.Mahalanobis", lambda: pood.Mahalanobis(identity)),
        ("pood.RMD", lambda: pood.RMD(identity)),
    ):
        batches = loader(x, y, args.batch)
        with PeakTensorMemory({x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}) as tracker:
            ctor().fit(batches)
        memory[name] = tracker.peak
        print(f"  {name:<18}{tracker.peak / 2**20:>9.1f} MiB")
    results["fit_peak_tensor_bytes"] = memory


if __name__ == "__main__":
    main()
