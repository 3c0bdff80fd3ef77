"""The API, not the domain, maps errors to HTTP statuses: each domain error class, subclasses by their nearest
base, API-layer errors by their own ``http_status``, anything else 500."""

from __future__ import annotations

import pytest

from moldd.api.handlers import UnsupportedMediaType, http_status
from moldd.api.protocol import RequestTimeout
from moldd.app.service import IdReused
from moldd.domain import errors as e


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (e.ValidationError("x"), 400),
        (e.PermissionDenied("x"), 403),
        (e.NotFound("x"), 404),
        (e.InvalidState("x"), 409),
        (e.Conflict("x"), 409),
        (e.CapacityError("x"), 409),
        (e.OperationFailed("x"), 502),
        (e.Unavailable("x"), 503),
        (e.NotLeader("x"), 503),
        (e.MolddError("x"), 500),
        (e.InternalError("x"), 500),
        (IdReused("x"), 409),  # a subclass elsewhere: its base's status
        (UnsupportedMediaType("x"), 415),  # API-layer errors carry their own
        (RequestTimeout("x"), 408),
    ],
)
def test_each_error_class_has_its_status(err: e.MolddError, status: int) -> None:
    assert http_status(err) == status


def test_domain_errors_carry_no_http_status() -> None:
    for cls in vars(e).values():
        if isinstance(cls, type) and issubclass(cls, e.MolddError):
            assert "http_status" not in vars(cls), cls
