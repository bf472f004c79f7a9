"""Fixtures of the deployment tests.

The served model and the server process come from the service tests' fixtures
(tests/service/conftest.py): ``model_dir`` is $TREX_TEST_MODEL_DIR, the shipped models/onnx
or an export made for the session, and ``ServerProcess`` runs ``python -m service.server``
on free loopback ports, as trex-serve runs in the image.
"""

from __future__ import annotations

import pytest

from tests.deploy import helpers
from tests.service.conftest import model_dir  # noqa: F401 - the fixture, reused as is


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """{"base" | overlay name: resources rendered by kubectl kustomize}."""
    out = {"base": helpers.kustomize(helpers.K8S / "base")}
    for overlay in helpers.OVERLAYS:
        out[overlay] = helpers.kustomize(helpers.K8S / "overlays" / overlay)
    return out
