"""The library's exceptions: defined in ood_core.errors, re-exported by ood_core.api, with pytorch-ood's alias."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ood_core.api as api
import ood_core.errors as errors

#: each exception and the built-in exceptions it also derives from
BASES: dict[str, tuple[type[Exception], ...]] = {
    "OODError": (Exception,),
    "RequiresFitException": (errors.OODError, RuntimeError),
    "ModelNotSetException": (errors.OODError, ValueError),
    "FeaturesNotSupportedError": (errors.OODError, NotImplementedError),
    "InvalidStateError": (errors.OODError, ValueError),
}


def test_alias_is_the_same_class() -> None:
    assert errors.RequiresFittingException is errors.RequiresFitException
    assert api.RequiresFittingException is errors.RequiresFitException


@pytest.mark.parametrize("name", [*BASES, "RequiresFittingException"])
def test_names_import_from_errors_and_api_as_one_class(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from ood_core.errors import {name} as from_errors\nfrom ood_core.api import {name} as from_api", namespace)
    assert namespace["from_errors"] is namespace["from_api"] is getattr(errors, name)
    assert name in errors.__all__


@pytest.mark.parametrize("name", BASES)
def test_base_classes(name: str) -> None:
    cls = getattr(errors, name)
    assert cls.__bases__ == BASES[name]
    assert issubclass(cls, errors.OODError)


def test_requires_fit_is_caught_as_the_alias_and_as_runtime_error() -> None:
    with pytest.raises(errors.RequiresFittingException):
        raise errors.RequiresFitException("fit first")
    with pytest.raises(RuntimeError):
        raise errors.RequiresFitException("fit first")
    try:
        raise api.RequiresFitException("fit first")
    except errors.RequiresFittingException as exc:
        assert isinstance(exc, errors.OODError)


def test_errors_and_calibration_do_not_import_api() -> None:
    """ood_core.errors depends on nothing in ood_core, ood_core.calibration only on it: no cycle with api."""
    script = (
        "import sys\n"
        "import ood_core.errors\n"
        "assert [m for m in sys.modules if m.startswith('ood_core.')] == ['ood_core.errors']\n"
        "import ood_core.calibration\n"
        "assert 'ood_core.api' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
