"""Command ids: what ``uuid.uuid4().hex`` gives (version 4, RFC 4122 variant), drawn without a UUID object."""

from __future__ import annotations

import uuid

from moldd.domain.ids import new_hex_id
from moldd.domain.names import unsafe_characters


def test_new_hex_ids_are_random_version_4_uuids() -> None:
    ids = {new_hex_id() for _ in range(5000)}
    assert len(ids) == 5000
    for h in ids:
        u = uuid.UUID(hex=h)
        assert (u.version, u.variant, u.hex, len(h)) == (4, uuid.RFC_4122, h, 32)


def test_ascii_fast_path_of_unsafe_characters_agrees_with_the_rule() -> None:
    for o in range(0x3000):
        c = chr(o)
        by_rule = unsafe_characters("\u00e9" + c)  # a non-ASCII text: checked character by character
        assert unsafe_characters("ab" + c) == by_rule, hex(o)
