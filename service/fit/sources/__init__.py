"""Streaming fit data sources (issue 9.1): :func:`open_source` and what it returns.

* :mod:`~service.fit.sources.base`: :class:`FitSource`, :class:`SourceIndex`, :class:`SourceLimits`,
  :class:`DataSourceError` (a 400 naming the member), member-name checks, class folders -> labels.
* :mod:`~service.fit.sources.folder`: a class-folder directory and a ``.zip`` of one.
* :mod:`~service.fit.sources.tar`: ``.tar`` / ``.tar.gz`` of one; :func:`iter_members`, the checked tar reader.
* :mod:`~service.fit.sources.shards`: WebDataset shards (``webdataset`` expands and groups them).
* :mod:`~service.fit.sources.precomputed`: a safetensors file of network outputs + labels (:func:`write_outputs`).
* :mod:`~service.fit.sources.loader`: :func:`iter_batches`, decoding in DataLoader worker processes.
* :mod:`~service.fit.sources.open`: :func:`open_source`, which picks one of the above for a path.
"""

from service.fit.sources.base import OOD_FOLDER, DataSourceError, FitSource, SourceIndex, SourceLimits
from service.fit.sources.loader import Batch, ImageDecoder, iter_batches
from service.fit.sources.open import open_source
from service.fit.sources.precomputed import write_outputs

__all__ = [
    "OOD_FOLDER",
    "Batch",
    "DataSourceError",
    "FitSource",
    "ImageDecoder",
    "SourceIndex",
    "SourceLimits",
    "iter_batches",
    "open_source",
    "write_outputs",
]
