"""present(): an explicit invariant check that survives ``python -O`` (unlike assert) and reports a bug as
InternalError (code internal_error), naming what was missing."""

from __future__ import annotations

import pytest

from moldd.domain.errors import InternalError, MolddError, present


@pytest.mark.parametrize("value", [0, "", [], False, "host0"])
def test_present_returns_any_value_that_is_not_none(value: object) -> None:
    assert present(value, "anything") is value


def test_present_raises_an_internal_error_naming_what_is_missing() -> None:
    with pytest.raises(InternalError, match="host of web-1 is not set") as info:
        present(None, "host of web-1")
    assert isinstance(info.value, MolddError)
    assert info.value.to_dict()["code"] == "internal_error"
