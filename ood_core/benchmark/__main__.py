"""``python -m ood_core.benchmark``: the digits benchmark (see :mod:`ood_core.benchmark`)."""

from ood_core.benchmark.runner import main

main()
