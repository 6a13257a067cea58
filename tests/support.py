"""What the test files share: how a missing optional part (scontrol, wandb, a Slurm lab, vLLM)
skips a test locally but fails it in CI."""

import os
import unittest


def require(feature: str, available: bool, how: str) -> None:
    """Skip when ``feature`` is missing, unless ``ATROPOS_TEST_REQUIRE`` lists it (or ``all``): then fail.

    CI sets ``ATROPOS_TEST_REQUIRE=all``, so a skipped check can never pass for a green run.
    """
    if available:
        return
    required = {f.strip() for f in os.environ.get("ATROPOS_TEST_REQUIRE", "").split(",")}
    message = f"{feature} is not available here; {how}"
    if feature in required or "all" in required:
        raise AssertionError(message + " (required by ATROPOS_TEST_REQUIRE)")
    raise unittest.SkipTest(message)
