"""``ood-fit`` / ``python -m service.fit`` / ``torchrun --nproc-per-node N -m service.fit``: see
:mod:`service.fit.cli`.

Before torch is imported, ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (as for ``ood-serve``: spinning OpenMP
threads slow forwards on shared cores, and here they would compete with the decoding workers).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP runtime starts

from service.fit.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    main()
