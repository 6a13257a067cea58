"""pytest only: an unclosed socket, transport, file or pipe fails the self-contained test that left it.

The files below need no service (vLLM, a Slurm lab, Atropos' venv), so a ``ResourceWarning``
there is a leak of the test's or of ``atropos_slurm``'s.  Python reports one when the object is
collected, from its ``__del__``, as an "unraisable" exception; pytest turns that into a
``PytestUnraisableExceptionWarning``, made an error here.  The GC may collect an object a test
or two later: the failing test is then a neighbour of the leaking one (``python -X
tracemalloc=20`` shows where the object was made).  The tests that need a service, and
``test_managed.py``'s classes that run in Atropos' venv (``IN_VENV_CLASSES``), are left as
they are.
"""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SELF_CONTAINED = {"test_atropos_slurm.py", "tests/test_units.py", "tests/test_hardening.py", "tests/test_dispatch.py",
                  "tests/test_atropos_compat.py", "tests/test_managed.py", "tests/test_watcher.py",
                  "tests/test_routing.py", "tests/test_token_protocols.py"}
LEAKS_FAIL = ("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")


def _runs_in_atropos_venv(item) -> bool:
    """``test_managed.py``'s classes run in Atropos' venv, and the test that runs them there."""
    name = getattr(getattr(item, "cls", None), "__name__", "")
    return name in getattr(getattr(item, "module", None), "IN_VENV_CLASSES", ()) or name.endswith("InAtroposVenv")


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = item.path if hasattr(item, "path") else item.fspath  # ``path`` from pytest 7
        path = os.path.relpath(str(where), HERE).replace(os.sep, "/")
        if path in SELF_CONTAINED and not _runs_in_atropos_venv(item):
            for spec in LEAKS_FAIL:
                item.add_marker(pytest.mark.filterwarnings(spec))
