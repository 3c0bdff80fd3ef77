from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moldd.domain.errors import Conflict, ValidationError
from moldd.domain.names import (
    generate_vm_name,
    internal_name,
    is_rfc1123_label,
    validate_display_name,
    validate_group_name,
    validate_hostname,
)


@given(st.sets(st.text(alphabet="abc", min_size=1, max_size=3), max_size=20))
def test_generated_names_are_rfc1123_and_unique(taken: set[str]) -> None:
    name = generate_vm_name(taken)
    assert is_rfc1123_label(name) and name not in taken and len(name) <= 63


def test_generation_gives_up_clearly_when_every_candidate_is_taken() -> None:
    with pytest.raises(Conflict):
        generate_vm_name({"aaaaaaaa"}, token=lambda n: "a" * n)


def test_generated_names_do_not_stutter_in_their_stream() -> None:
    """The stream is ``vm-<name>``: a generated name has no ``vm-`` prefix of its own and starts with a letter."""
    for _ in range(200):
        name = generate_vm_name(set())
        assert not name.startswith("vm-") and name[0].isalpha() and len(name) == 8


@pytest.mark.parametrize("good", ["web", "web-1", "a", "a" * 63, "Web-01"])
def test_good_hostnames(good: str) -> None:
    assert validate_hostname(good) == good.lower()


@pytest.mark.parametrize(
    ("bad", "why"),
    [("", "1-63"), ("a" * 64, "1-63"), ("1web", "digit"), ("-web", "DNS label"), ("web-", "DNS label"),
     ("we_b", "DNS label"), ("web.example", "DNS label"), (5, "string")],
)  # fmt: skip
def test_bad_hostnames_are_refused_with_the_reason(bad: object, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        validate_hostname(bad)
    assert why in refused.value.message and refused.value.field == "hostname"


@pytest.mark.parametrize("bad", ["", " ", "x" * 256, "tab\there", "bell\x07", "nc\ufffe", "sur\ud800"])
def test_bad_display_names(bad: str) -> None:
    with pytest.raises(ValidationError):
        validate_display_name(bad)


def test_display_name_is_trimmed_and_may_be_any_printable_text() -> None:
    assert validate_display_name("  Web server (prod) — 1 ") == "Web server (prod) — 1"


@pytest.mark.parametrize("bad", ["", "-x", "a" * 64, "a/b", 3])
def test_bad_group_names(bad: object) -> None:
    with pytest.raises(ValidationError):
        validate_group_name(bad)


def test_internal_name_follows_the_pattern_and_may_append_the_display_name() -> None:
    kw = {"account": "2", "vm_id": 17, "instance": "VM", "display_name": "Web Server #1"}
    assert internal_name("i-{account}-{id}-{instance}", append_display_name=False, **kw) == "i-2-17-VM"  # type: ignore[arg-type]
    assert (
        internal_name("i-{account}-{id}-{instance}", append_display_name=True, **kw)
        == "i-2-17-VM-web-server-1"
    )  # type: ignore[arg-type]
