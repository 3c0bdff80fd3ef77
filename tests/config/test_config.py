"""The configuration is declared once (pydantic schemas), checked whole before anything is created, and every
bad file is refused with exit 2 and one line naming the file, the key and the reason."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moldd.config import (
    README_END,
    README_START,
    Config,
    ConfigError,
    check_environment,
    config_reference,
    load_config,
)
from moldd.daemon import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(
    root: Path,
    *,
    daemon: dict[str, Any] | None = None,
    ha: dict[str, Any] | None = None,
    host: dict[str, Any] | None = None,
    template: dict[str, Any] | None = None,
    extra: str = "",
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "images" / "t.qcow2").write_bytes(b"QFI\xfb")
    (root / "run").mkdir(exist_ok=True)
    d = {"socket": "run/moldd.sock", "database": "state/log.db", "storage_dir": "state/disks"} | (daemon or {})
    h = {"name": "h1", "uri": "test:///default"} | (host or {})
    t = {"name": "tiny", "image": "images/t.qcow2"} | (template or {})
    lines = ["[daemon]", *(f"{k} = {_toml(v)}" for k, v in d.items() if v is not None), "", "[ha]"]
    lines += [f"{k} = {_toml(v)}" for k, v in (ha or {}).items()]
    lines += ["", "[[hosts]]", *(f"{k} = {_toml(v)}" for k, v in h.items() if v is not None)]
    lines += ["", "[[templates]]", *(f"{k} = {_toml(v)}" for k, v in t.items() if v is not None), extra]
    path = root / "moldd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def refused(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``moldd --config path --check-config`` in-process; it must exit 2 with one line."""
    assert main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"moldd: bad configuration: {path}: key "), err
    return err


def test_good_config_parses_with_the_public_shape(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ha={"fence_command": ["fence", "{host}", "--uri={uri}"]}))
    assert isinstance(config, Config)
    assert config.socket == tmp_path / "run" / "moldd.sock" and config.socket_mode == 0o660
    assert config.database == tmp_path / "state" / "log.db"
    assert config.host("h1") is not None and config.template("tiny") is not None
    assert config.ha.fence_command == ("fence", "{host}", "--uri={uri}") and config.ha.max_restarts == 5
    assert config.api.max_connections >= 1 and config.checkpoints.key is None
    assert check_environment(config) is None
    assert not (tmp_path / "state").exists(), "checking created something"


BAD_VALUES = [
    # (section, key, value, words expected in the reason)
    ("daemon", "stop_timeout_s", math.nan, "finite"),
    ("daemon", "stop_timeout_s", math.inf, "finite"),
    ("daemon", "stop_timeout_s", -1, "greater than 0"),
    ("daemon", "stop_timeout_s", 0, "greater than 0"),
    ("daemon", "stop_timeout_s", "60", "valid number"),
    ("daemon", "expunge_delay_s", -5.0, "greater than or equal to 0"),
    ("daemon", "expunge_delay_s", math.nan, "finite"),
    ("daemon", "tolerated_host_failures", -1, "greater than or equal to 0"),
    ("daemon", "tolerated_host_failures", True, "integer"),
    ("daemon", "tolerated_host_failures", 1.5, "integer"),
    ("daemon", "socket_mode", "0666", "every local user"),
    ("daemon", "socket_mode", "rw", "octal"),
    ("daemon", "socket_mode", 432, "octal"),
    ("daemon", "log_level", "loud", "'debug'"),
    ("daemon", "internal_name_pattern", "{name}", "{name}"),
    ("daemon", "snapshot_every", 0, "greater than or equal to 1"),
    ("daemon", "no_such_key", 1, "unknown key"),
    ("ha", "fence_command", ["fence-ipmi", "{hostname}"], "{hostname}"),
    ("ha", "fence_command", [], "empty"),
    ("ha", "fence_command", "fence-ipmi {host}", "tuple"),
    ("ha", "backoff_cap_s", 0.1, "backoff_base_s"),
    ("ha", "max_restarts", -3, "greater than or equal to 1"),
    ("ha", "keepalive_count", math.inf, "integer"),
    ("host", "uri", "garbage", "libvirt URI"),
    ("host", "uri", "qemu+ssh:/ /kvm1", "libvirt URI"),
    ("host", "uri", "http://kvm1/", "driver"),
    ("host", "uri", "qemu+carrier-pigeon://kvm1/system", "transport"),
    ("host", "migration_uri", "10.0.0.1", "tcp://"),
    ("host", "name", "Bad_Name", "RFC 1123"),
    ("host", "max_vms", 0, "greater than or equal to 1"),
    ("host", "fence_command", ["x", "{0}"], "{0}"),
    ("template", "image", "images/missing.qcow2", "does not exist"),
    ("template", "image", "images", "not a regular file"),
    ("template", "kernel", "images/nope", "does not exist"),
]


@pytest.mark.parametrize(("section", "key", "value", "words"), BAD_VALUES)
def test_bad_value_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, key: str, value: Any, words: str
) -> None:
    kw: dict[str, Any] = {section: {key: value}}
    path = write(tmp_path, **kw)
    err = refused(path, capsys)
    dotted = {"host": "hosts[0]", "template": "templates[0]"}.get(section, section)
    assert f"key {dotted}.{key}:" in err, err
    assert words in err, err
    assert not (tmp_path / "state").exists()


def test_unreadable_or_non_utf8_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path)
    path.write_bytes(path.read_bytes() + b'\n# caf\xe9\n')
    assert "not UTF-8" in refused(path, capsys)
    assert "file not found" in refused(tmp_path / "nope.toml", capsys)
    assert "is a directory" in refused(tmp_path / "images", capsys)


def test_unknown_section_and_wrong_table_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown section" in refused(write(tmp_path, extra="[bogus]\nx = 1\n"), capsys)
    path = write(tmp_path)
    path.write_text("offerings = 3\n" + path.read_text())
    assert "array of tables" in refused(path, capsys)
    text = write(tmp_path).read_text().replace("[[hosts]]", "[hosts]")
    (tmp_path / "moldd.toml").write_text(text)
    assert "key hosts:" in refused(tmp_path / "moldd.toml", capsys)


def test_environment_errors_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the socket's directory does not exist: refused, not created as root with mkdir -p
    err = refused(write(tmp_path, daemon={"socket": "missing/dir/moldd.sock"}), capsys)
    assert "key daemon.socket:" in err and "does not exist" in err
    assert not (tmp_path / "missing").exists()
    # the database is a directory
    (tmp_path / "dbdir").mkdir()
    err = refused(write(tmp_path, daemon={"database": "dbdir"}), capsys)
    assert "key daemon.database:" in err and "is a directory" in err
    # the database sits under a regular file
    (tmp_path / "afile").write_text("x")
    err = refused(write(tmp_path, daemon={"database": "afile/log.db"}), capsys)
    assert "key daemon.database:" in err and "not a directory" in err
    # an unknown socket group: refused before the database exists
    err = refused(write(tmp_path, daemon={"socket_group": "no-such-group-moldd"}), capsys)
    assert "key daemon.socket_group:" in err and "no such group" in err
    assert not (tmp_path / "state").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_database_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").mkdir()
    db = tmp_path / "state" / "log.db"
    db.write_bytes(b"")
    db.chmod(0)
    err = refused(write(tmp_path), capsys)
    assert "key daemon.database:" in err and "readable and writable" in err


def test_daemon_process_exits_2_with_one_line(tmp_path: Path) -> None:
    """The real entry point, as systemd runs it: exit 2, one line, no traceback, nothing created."""
    path = write(tmp_path, daemon={"socket_group": "no-such-group-moldd"})
    res = subprocess.run(
        [sys.executable, "-m", "moldd.daemon", "--config", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert str(path) in res.stderr and "daemon.socket_group" in res.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "run" / "moldd.sock").exists()


def test_parse_errors_carry_file_key_reason(tmp_path: Path) -> None:
    path = write(tmp_path, ha={"window_s": -1})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "ha.window_s")
    assert "greater than 0" in info.value.reason and "-1" in info.value.reason


def test_readme_reference_is_generated_from_the_schema() -> None:
    """Regenerate with ``python -m moldd.config --update-readme README.md``."""
    text = README.read_text()
    assert README_START in text and README_END in text
    section = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert section.strip() == config_reference().strip()


def test_every_key_is_documented_with_a_type_and_a_meaning() -> None:
    for name, model in Config.sections().items():
        assert model.__doc__, name
        for key, info in model.model_fields.items():
            assert info.description, f"{name}.{key} has no description"
