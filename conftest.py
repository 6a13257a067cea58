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
                  "tests/test_atropos_compat.py", "tests/test_managed.py", "tests/test_watcher.py"}
LEAKS_FAIL = ("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = os.path.relpath(str(item.fspath), HERE).replace(os.sep, "/")
        cls = getattr(item, "cls", None)
        in_venv = getattr(getattr(item, "module", None), "IN_VENV_CLASSES", ())
        if path in SELF_CONTAINED and not (cls is not None and (cls.__name__ in in_venv
                                                                 or cls.__name__.endswith("InAtroposVenv"))):
            for spec in LEAKS_FAIL:
                item.add_marker(pytest.mark.filterwarnings(spec))
