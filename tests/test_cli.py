"""The CLI contract: help everywhere, documented commands, exit codes, no tracebacks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from leadloop.cli import cli

REPO = Path(__file__).resolve().parents[1]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


@pytest.mark.parametrize("path", _commands(cli), ids=" ".join)
def test_every_command_has_help_and_is_in_the_readme(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    readme_lines = [
        line for line in (REPO / "README.md").read_text().splitlines()
        if re.search(rf"`leadloop (-c FILE )?{path[0]}\b", line)
    ]
    assert any(path[-1] in line for line in readme_lines), f"README lacks `leadloop {' '.join(path)}`"


def test_invalid_config_exits_2_naming_every_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[crm]\nkind = "zoho"\ntoken_env = "x y"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "leadloop", "-c", str(cfg), "sync"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "config key crm.kind:" in proc.stderr
    assert "config key crm.token_env:" in proc.stderr
    assert "config key stages: Field required" in proc.stderr


def test_missing_config_is_a_usage_error():
    result = CliRunner().invoke(cli, ["sync"])
    assert result.exit_code == 2
    assert "needs --config" in result.output


def test_missing_secret_is_one_error_line_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/x.db"\n'
        '[crm]\nkind = "hubspot"\nbase_url = "http://127.0.0.1:9"\ntoken_env = "NO_SUCH_TOKEN_VAR"\n'
        '[[stages]]\nname = "Q"\ncrm_values = ["salesqualifiedlead"]\nmacro = true\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "leadloop", "-c", str(cfg), "sync"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "NO_SUCH_TOKEN_VAR is not set" in proc.stdout + proc.stderr
