"""Every relative path in a config resolves against the config file's folder, the same way for
the database, the CSV export, models, reports and output folders, whatever the working
directory; `leadloop demo` and `-c config/demo.toml` agree on the store and the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from leadloop.cli import cli
from leadloop.config import load_settings
from leadloop.demo import DEMO_CONFIG, default_out

CONFIG = """
[database]
url = "sqlite:///state/leadloop.db"

[crm]
kind = "csv"
lead_stage_property = "stage"

[crm.csv]
path = "data/leads.csv"
id_column = "id"
created_column = "created"
stage_columns = { Won = "won_at" }

[crm.csv.join]
path = "data/extra.csv"
on = "id"

[[stages]]
name = "Won"
crm_values = ["Won"]
macro = true
value = 10.0
destinations = { files = "Won" }

[destinations.files]
kind = "csv_files"
output_dir = "out/uploads"

[model]
dir = "out/models"
min_leads = 1
min_conversions = 1

[report]
out_dir = "out/reports"
"""


def _write_config(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "leads.csv").write_text(
        "id,created,won_at,channel\n"
        "a,2024-01-01T00:00:00,2024-01-05T00:00:00,ads\n"
        "b,2024-01-02T00:00:00,,seo\n")
    (folder / "data" / "extra.csv").write_text("id,plan\na,pro\n")
    path = folder / "leadloop.toml"
    path.write_text(CONFIG)
    return path


def test_every_relative_path_resolves_against_the_config_folder(tmp_path, monkeypatch):
    config = _write_config(tmp_path / "cfg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(Path("..") / "cfg" / "leadloop.toml")  # a relative --config as well
    folder = config.parent.resolve()
    assert s.database.url == f"sqlite:///{folder / 'state' / 'leadloop.db'}"
    assert s.crm.csv is not None and s.crm.csv.join is not None
    assert Path(s.crm.csv.path) == folder / "data" / "leads.csv"
    assert Path(s.crm.csv.join.path) == folder / "data" / "extra.csv"
    assert Path(s.model.dir) == folder / "out" / "models"
    assert Path(s.report.out_dir) == folder / "out" / "reports"
    assert Path(s.destinations["files"].output_dir or "") == folder / "out" / "uploads"
    # resolve_path, which the jobs use, agrees and leaves absolute paths alone
    assert s.resolve_path(s.model.dir) == folder / "out" / "models"
    assert s.resolve_path("x.csv") == folder / "x.csv"


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///leadloop.db", "sqlite:///{base}/leadloop.db"),
    ("sqlite:///../up.db?timeout=5", "sqlite:///{base.parent}/up.db?timeout=5"),
    ("sqlite:////abs/leadloop.db", "sqlite:////abs/leadloop.db"),
    ("postgresql://u@127.0.0.1:5432/db", "postgresql://u@127.0.0.1:5432/db"),
])
def test_database_url_forms(tmp_path, url, expected):
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.replace('"sqlite:///state/leadloop.db"', f'"{url}"'))
    assert load_settings(config).database.url == expected.format(base=tmp_path.resolve())


def test_the_default_database_sits_beside_the_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.replace('url = "sqlite:///state/leadloop.db"', ""))
    assert load_settings(config).database.url == f"sqlite:///{tmp_path.resolve() / 'leadloop.db'}"


def test_commands_from_different_folders_share_one_store_and_model(tmp_path, monkeypatch):
    config = _write_config(tmp_path / "cfg")
    runner = CliRunner()
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    result = runner.invoke(cli, ["-c", str(config), "sync"])
    assert result.exit_code == 0, result.output
    assert "leads=2" in result.output
    monkeypatch.chdir(second)
    result = runner.invoke(cli, ["-c", str(config), "status"])
    assert "sync" in result.output and "leads=2" in result.output, result.output
    assert (config.parent / "state" / "leadloop.db").is_file()
    assert not list(first.iterdir()) and not list(second.iterdir())  # nothing in either cwd


def test_demo_and_its_config_name_the_same_store_model_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    out = default_out()
    settings = load_settings(DEMO_CONFIG)
    assert out.is_absolute() and out == DEMO_CONFIG.parent.parent / "demo-output"
    assert settings.database.url == f"sqlite:///{out / 'leadloop.db'}"
    assert Path(settings.model.dir) == out / "models"
    assert Path(settings.report.out_dir) == out
