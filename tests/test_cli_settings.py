"""Settings as a newcomer meets them: a refused value names its setting and its
source, a misspelled CARSVC_* variable is warned about, `carsvc config` lists
every setting with its value and source, and a port in use is one line and
exit 2 (the CLI through real subprocesses)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from carsvc.config import OTHER_VARIABLES, SettingError, Settings, env_name, sources, unknown_variables
from tests.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = [f.name for f in dataclasses.fields(Settings) if type(f.default) in (int, float)]


def _carsvc(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CARSVC_")}
    return subprocess.run(
        [sys.executable, "-m", "carsvc", *args], cwd=ROOT, capture_output=True, text=True,
        env={**clean, **(env or {})}, timeout=timeout,
    )


def test_a_negative_unplaced_timeout_is_refused_with_its_name_and_source() -> None:
    with pytest.raises(SettingError, match=re.escape(
        "unplaced_timeout_s must not be negative, not -1.0 (CARSVC_UNPLACED_TIMEOUT_S='-1')"
    )) as caught:
        Settings.from_env({"CARSVC_UNPLACED_TIMEOUT_S": "-1"})
    assert caught.value.name == "unplaced_timeout_s"
    refused = "port must be within 0..65535, not 70000 (from the command line)"
    with pytest.raises(SettingError, match=re.escape(refused)):
        Settings.from_env({}, port=70000)
    # 0 is "as long as it takes", as for the other timeouts.
    assert Settings.from_env({"CARSVC_UNPLACED_TIMEOUT_S": "0"}).unplaced_timeout_s == 0


@pytest.mark.parametrize("name", NUMBERS)
def test_every_number_is_finite_and_not_negative(name: str) -> None:
    with pytest.raises(SettingError, match=f"^{name} must (not be negative|be positive|be within)") as caught:
        Settings().replace(**{name: -1}).validate()
    assert caught.value.name == name
    if isinstance(getattr(Settings(), name), float):
        for bad in (math.nan, math.inf):
            with pytest.raises(SettingError, match=f"^{name} must be a finite number"):
                Settings().replace(**{name: bad}).validate()


def test_a_bad_bool_says_what_is_accepted() -> None:
    with pytest.raises(SettingError, match=re.escape("CARSVC_RESUME_RUNS='maybe' is not true or false")):
        Settings.from_env({"CARSVC_RESUME_RUNS": "maybe"})


def test_unknown_carsvc_variables_are_named_with_the_nearest_setting() -> None:
    environ = {
        "CARSVC_UNPLACED_TIMEOUT": "5", "CARSVC_LOGLEVEL": "DEBUG", "CARSVC_WHATEVER": "1",
        "CARSVC_PORT": "6000", "CARSVC_NO_EXTENSIONS": "1", "CARSVC_TARGET": "x", "HOME": "/root",
    }
    assert unknown_variables(environ) == [
        "CARSVC_LOGLEVEL is not a carsvc setting and is ignored; did you mean CARSVC_LOG_LEVEL?",
        "CARSVC_UNPLACED_TIMEOUT is not a carsvc setting and is ignored; did you mean CARSVC_UNPLACED_TIMEOUT_S?",
        "CARSVC_WHATEVER is not a carsvc setting and is ignored; `carsvc config` lists the settings",
    ]


def test_every_carsvc_variable_the_repository_reads_is_known() -> None:
    """A CARSVC_* name anywhere in the code or docs is a setting or listed in
    carsvc.config.OTHER_VARIABLES (else `carsvc serve` would warn about it)."""
    settings = {env_name(f.name) for f in dataclasses.fields(Settings)}
    found: dict[str, str] = {}
    skip = {"node_modules", "target", "gen", "_proto", ".venv", "build", "dist", "__pycache__"}
    suffixes = {".py", ".md", ".sh", ".go", ".ts", ".rs", ".toml", ".yaml", ".yml"}
    for top in ("carsvc", "tests", "clients", "docs", "scripts", "bench", "README.md", "SECURITY.md", "setup.py"):
        base = ROOT / top
        paths = [base] if base.is_file() else [
            p for p in base.rglob("*") if p.suffix in suffixes and not skip & set(p.relative_to(ROOT).parts)
        ]
        for path in paths:
            if path.name == "test_cli_settings.py":
                continue  # misspells them on purpose
            text = path.read_text(errors="replace")
            for name in re.findall(r"\bCARSVC_[A-Z0-9_]*[A-Z0-9]\b", text):
                if f"{name} is not a carsvc setting" not in text:  # a warning shown in the docs
                    found.setdefault(name, str(path.relative_to(ROOT)))
    # Placeholders in prose, not variables.
    found.pop("CARSVC_NAME", None)
    unknown = {name: where for name, where in found.items() if name not in settings | set(OTHER_VARIABLES)}
    assert not unknown, f"add these to carsvc.config.OTHER_VARIABLES (name: what reads it): {unknown}"


def test_sources_say_where_each_value_comes_from() -> None:
    found = sources({"CARSVC_PORT": "6000"}, host="0.0.0.0", data_dir=None)
    assert (found["port"], found["host"], found["data_dir"]) == ("env CARSVC_PORT", "command line", "default")


def test_every_setting_is_in_the_configuration_docs() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"| `{f.name}` |" not in text]
    assert not missing, f"docs/configuration.md has no row for {missing}"


# -- the command, as a subprocess ------------------------------------------------------


def test_config_prints_every_setting_with_value_and_source() -> None:
    done = _carsvc(
        "config", "--data-dir", "/tmp/journal",
        env={"CARSVC_PORT": "6000", "CARSVC_WORKER_TOKENS": "secret-1,secret-2", "CARSVC_MAX_ATEMPTS": "5"},
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert set(rows) == {f.name for f in dataclasses.fields(Settings)}
    assert rows["port"] == ["6000", "env", "CARSVC_PORT"]
    assert rows["data_dir"] == ["/tmp/journal", "command", "line"]
    assert rows["unplaced_timeout_s"] == ["30.0", "default"]
    assert "secret" not in done.stdout and rows["worker_tokens"][:2] == ["(2", "tokens)"]
    assert done.stderr == (
        "carsvc: warning: CARSVC_MAX_ATEMPTS is not a carsvc setting and is ignored; "
        "did you mean CARSVC_MAX_ATTEMPTS?\n"
    )


def test_config_json_and_a_refused_value() -> None:
    done = _carsvc("config", "--json", env={"CARSVC_UNPLACED_TIMEOUT_S": "5"})
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    assert config["unplaced_timeout_s"] == {"value": 5.0, "source": "env CARSVC_UNPLACED_TIMEOUT_S",
                                            "env": "CARSVC_UNPLACED_TIMEOUT_S"}
    done = _carsvc("config", env={"CARSVC_UNPLACED_TIMEOUT_S": "-1"})
    assert done.returncode == 2
    assert done.stderr == (
        "carsvc: unplaced_timeout_s must not be negative, not -1.0 (CARSVC_UNPLACED_TIMEOUT_S='-1')\n"
    )


def test_serve_refuses_a_negative_timeout_and_its_help_points_to_config() -> None:
    done = _carsvc("serve", "--port", "0", env={"CARSVC_UNPLACED_TIMEOUT_S": "-1"})
    assert done.returncode == 2
    assert "unplaced_timeout_s must not be negative" in done.stderr
    done = _carsvc("serve", "--help")
    assert done.returncode == 0
    assert "CARSVC_<NAME>" in done.stdout and "`carsvc config` lists every setting" in done.stdout


def test_serve_warns_about_a_misspelled_variable() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "carsvc", "serve", "--port", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CARSVC_UNPLACED_TIMEOUT": "5"},
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while "listening on" not in (line := proc.stderr.readline()):
            assert line, "".join(lines)
            lines.append(line)
        assert any(
            "WARNING carsvc: CARSVC_UNPLACED_TIMEOUT is not a carsvc setting and is ignored; "
            "did you mean CARSVC_UNPLACED_TIMEOUT_S?" in line for line in lines
        ), lines
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        done = _carsvc("serve", "--port", str(port))
    assert done.returncode == 2
    assert done.stderr == (
        f"carsvc: 127.0.0.1:{port} is already in use (another sidecar? choose a port with --port or CARSVC_PORT)\n"
    )


def test_config_shows_a_backend_url_without_its_password() -> None:
    done = _carsvc("config", "--json", "--backend", "redis://:s3cret@redis.example:6379/2")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["backend"]
    assert shown["value"] == "redis://:***@redis.example:6379/2" and "s3cret" not in done.stdout
