"""Which FUSE front ends a cache-node test runs on.

The ``frontend`` fixture (tests/conftest.py) gives every test pyfuse3 and passthrough. The
suites that check the data path and the durability rules run on the splice front end too
(the default on kernels without passthrough): they say so with ``ON_ALL_FRONTENDS``::

    pytestmark = ON_ALL_FRONTENDS
"""

from __future__ import annotations

import pytest

ALL_FRONTENDS = ("pyfuse3", "passthrough", "splice")
ON_ALL_FRONTENDS = pytest.mark.parametrize("frontend", ALL_FRONTENDS, indirect=True)
