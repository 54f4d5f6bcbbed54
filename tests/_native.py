"""Shared by the tests of the C++/CUDA extension: load it, or skip (fail under $FROMAGE_FUSED_REQUIRE_EXT)."""
import os

import pytest

from fromage_fused.backends import native


def require_native():
    """Load the extension; a build failure skips the test, or fails it when CI requires the extension."""
    try:
        return native.load()
    except Exception as exc:  # BackendUnavailable, or RuntimeError under the env var
        if os.environ.get(native.REQUIRE_ENV, "").strip() not in ("", "0"):
            pytest.fail(f"the C++ extension is required ({native.REQUIRE_ENV}) but failed: {exc}")
        pytest.skip(f"C++ extension unavailable: {exc}")
