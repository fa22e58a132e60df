"""Fitting at scale, web-free: streaming data sources, the fit runner, ``ood-fit`` and torchrun (issue 9).

Module map (filled in as modules land):
- ``__main__``: the ``ood-fit`` entry point (also ``torchrun -m service.fit``).
"""
