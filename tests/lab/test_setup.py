"""moldlab.setup: the qemu.conf edit is idempotent and keeps the rest of the file (no libvirt needed)."""

from __future__ import annotations

from moldlab.setup import QEMU_CONF_SETTINGS, set_conf_values


def test_set_conf_values_replaces_in_place_and_keeps_other_lines() -> None:
    text = '# comment\n#user = "libvirt-qemu"\nuser = "nobody"\nvnc_listen = "0.0.0.0"\nuser="dup"\n'
    out = set_conf_values(text, QEMU_CONF_SETTINGS)
    lines = out.splitlines()
    assert lines[:4] == ["# comment", '#user = "libvirt-qemu"', 'user = "root"', 'vnc_listen = "0.0.0.0"']
    assert 'stdio_handler = "file"' in lines and 'group = "root"' in lines
    assert sum(1 for ln in lines if ln.startswith("user")) == 1
    assert set_conf_values(out, QEMU_CONF_SETTINGS) == out


def test_set_conf_values_on_empty_file() -> None:
    out = set_conf_values("", {"stdio_handler": '"file"'})
    assert out.splitlines()[-1] == 'stdio_handler = "file"'
    assert set_conf_values(out, {"stdio_handler": '"file"'}) == out
