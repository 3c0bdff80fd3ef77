"""Pure rules for hot scale-up and root-disk resize."""

from __future__ import annotations

from typing import Any

import pytest

from moldd.domain.errors import InvalidState, ValidationError
from moldd.domain.scaling import ScalePlan, check_resize, check_scale


def offering(name: str, vcpus: int, mem: int, dynamic: bool = True) -> dict[str, Any]:
    return {"name": name, "vcpus": vcpus, "memory_mib": mem, "dynamic": dynamic}


SMALL = offering("small", 1, 128)


def test_scale_up_within_the_maxima_returns_what_changes() -> None:
    assert check_scale(SMALL, offering("plus", 2, 128), max_vcpus=2, max_memory_mib=256) == ScalePlan(2, None)
    assert check_scale(SMALL, offering("mem", 1, 256), max_vcpus=2, max_memory_mib=256) == ScalePlan(
        None, 256
    )


@pytest.mark.parametrize(
    ("current", "new", "words"),
    [
        (SMALL, offering("small", 1, 128), "already uses"),
        (offering("fixed", 1, 128, dynamic=False), offering("plus", 2, 128), "not dynamically scalable"),
        (SMALL, offering("static", 2, 128, dynamic=False), "not dynamically scalable"),
        (offering("two", 2, 128), offering("one", 1, 192), "only goes up"),
        (SMALL, offering("less-mem", 1, 64), "only goes up"),
        (SMALL, offering("big", 4, 128), "maximum of 2"),
        (SMALL, offering("huge-mem", 1, 512), "maximum of 256 MiB"),
    ],
)
def test_scale_refusals_say_why(current: dict[str, Any], new: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as exc:
        check_scale(current, new, max_vcpus=2, max_memory_mib=256)
    assert exc.value.field == "offering" and words in exc.value.message


def test_resize_grow_and_shrink_rules() -> None:
    assert check_resize(1.0, 2, shrink_ok=False, snapshots=0) is False
    assert check_resize(2.0, 1, shrink_ok=True, snapshots=0) is True
    with pytest.raises(ValidationError) as same:
        check_resize(2.0, 2, shrink_ok=True, snapshots=0)
    assert same.value.field == "size"
    with pytest.raises(ValidationError) as shrink:
        check_resize(2.0, 1, shrink_ok=False, snapshots=0)
    assert shrink.value.field == "shrinkok"
    with pytest.raises(InvalidState, match="snapshot"):
        check_resize(1.0, 2, shrink_ok=False, snapshots=1)
