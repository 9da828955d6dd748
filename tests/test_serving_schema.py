"""Schemathesis over the OpenAPI spec: whatever a client sends, valid or not, never a
5xx, and every answer matches the documented schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from recsys.service import Model, RecService
from serving.app import create_app
from serving.settings import Settings


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(
    bundle_dir: Path, tmp_path: Path, mode: GenerationMode
) -> None:
    model = Model.load(bundle_dir, tmp_path / "trees")
    model.warm()
    app = create_app(RecService(model), Settings(admin_token="t"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error]
    if mode == GenerationMode.POSITIVE:
        checks.append(response_schema_conformance)
    n = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/admin/reload":
            continue  # would load bundles from generated paths; covered in test_serving

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=checks)

        try:
            run()
        except Unsatisfiable:  # nothing to get wrong (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE
            continue
        n += 1
    assert n >= 4
