"""Load and validate leadloop's TOML configuration.

The file holds behaviour only. Secrets are never in it: each secret is the *name* of an
environment variable (`token_env`, `client_secret_env`, ...), read by `Settings.secret()` when a
connector or exporter needs it. Every problem in a file is reported at once, one line per key
path, as `ConfigErrors` (exit code 2 at the CLI).
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from leadloop.crm import CRM_KINDS
from leadloop.envnames import EnvName
from leadloop.envnames import check_env_name as _check_env_name
from leadloop.errors import ConfigError, ConfigErrors, MissingSecretError
from leadloop.export.registry import DESTINATIONS
from leadloop.expr import parse as parse_expression
from leadloop.redact import register_secret

if TYPE_CHECKING:
    from leadloop.export.base import DestinationSettings

if TYPE_CHECKING:
    CrmKind = str
else:  # the connector modules of leadloop/crm/: a new CRM is its module, nothing to add here
    CrmKind = Literal[CRM_KINDS]
ValueRule = float | Literal["deal_amount", "predicted"]
MicroRole = Literal["primary goal", "secondary signal", "diagnostic only", "retire"]

_INTERVAL = re.compile(r"^(\d+)\s*([smhd])$")
_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?]+$")


class _Model(BaseModel):
    """Strict base: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Model):
    url: str = "sqlite:///leadloop.db"
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, v: str) -> str:
        check_database_url(v)
        return v


def check_database_url(url: str) -> None:
    """Refuse a database URL that cannot work, or works on something that is not kept: an
    in-memory SQLite database (`sqlite:///`, `sqlite://`, `:memory:`) loses every sync."""
    if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
        raise ValueError("must start with sqlite:/// or postgresql://")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise ValueError("a SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/"
                             "path.db (three slashes, then the file)")
        path = url.removeprefix("sqlite:///").partition("?")[0]
        if not path.strip() or path.strip() == ":memory:" or path.startswith("file::memory:"):
            raise ValueError("names no file (an in-memory database would lose every sync); "
                             "give a path, e.g. sqlite:///leadloop.db")
        if path.endswith("/"):
            raise ValueError(f"{path!r} is a folder; name the database file in it")
        return


class AttributionProperties(_Model):
    """CRM property (or CSV column) names that hold attribution data; accounts name them freely."""

    email: str | None = "email"
    phone: str | None = "phone"
    created_at: str | None = "createdate"
    gclid: str | None = "hs_google_click_id"
    gbraid: str | None = None
    wbraid: str | None = None
    fbclid: str | None = "hs_facebook_click_id"
    fbc: str | None = None
    msclkid: str | None = None
    li_fat_id: str | None = "hs_linkedin_click_id"
    meta_lead_id: str | None = None
    utm_source: str | None = "hs_analytics_source"
    utm_medium: str | None = None
    utm_campaign: str | None = "hs_analytics_source_data_1"
    landing_page: str | None = "hs_analytics_first_url"
    country: str | None = None
    consent_ad_user_data: str | None = None
    consent_ad_personalization: str | None = None


class CsvJoin(_Model):
    """A second file joined on the id column (e.g. Olist closed deals onto its MQLs)."""

    path: str
    on: str
    columns: list[str] = Field(default_factory=list)


class CsvMapping(_Model):
    """How to read a CRM export: which column holds what."""

    path: str
    delimiter: str | None = None  # detected when absent
    encoding: str | None = None  # detected when absent
    id_column: str
    created_column: str | None = None
    created_format: str | None = None
    stage_columns: dict[str, str] = Field(
        default_factory=dict,
        description="stage name -> column holding the time (or a truthy flag) it was reached",
    )
    label_column: str | None = None
    positive_values: list[str] = Field(default_factory=lambda: ["1", "yes", "true", "y"])
    amount_column: str | None = None
    missing_values: list[str] = Field(default_factory=lambda: ["", "Select", "NA", "N/A"])
    join: CsvJoin | None = None


class CrmConfig(_Model):
    kind: CrmKind
    name: str | None = Field(None, description="source name stored on each lead; default: kind")
    base_url: str | None = None
    token_env: EnvName | None = None
    # OAuth (HubSpot public apps, Salesforce): names of env vars, never the values
    client_id_env: EnvName | None = None
    client_secret_env: EnvName | None = None
    refresh_token_env: EnvName | None = None
    auth_flow: Literal["token", "refresh_token", "client_credentials"] = "token"
    token_url: str | None = None
    api_version: str | None = None
    page_size: int | None = Field(None, ge=1, le=2000)
    lookback_minutes: float = Field(10.0, ge=0)
    requests_per_10s: float | None = Field(None, gt=0)
    daily_request_limit: int | None = Field(None, gt=0)
    default_region: str = "US"
    timeout_seconds: float = Field(30.0, gt=0)
    properties: AttributionProperties = AttributionProperties()
    extra_properties: list[str] = Field(
        default_factory=list, description="more CRM properties kept (non-PII) as lead attributes"
    )
    lead_stage_property: str = "lifecyclestage"
    deal_stage_property: str = "dealstage"
    objects: list[str] = Field(default_factory=lambda: ["contacts", "deals"])
    csv: CsvMapping | None = None

    @field_validator("token_env", "client_id_env", "client_secret_env", "refresh_token_env")
    @classmethod
    def _env_names(cls, v: str | None) -> str | None:
        return _check_env_name(v)

    @model_validator(mode="after")
    def _csv_needs_mapping(self) -> CrmConfig:
        if self.kind == "csv" and self.csv is None:
            raise ValueError("kind = 'csv' needs a [crm.csv] table with at least path and id_column")
        return self

    @property
    def source_name(self) -> str:
        return self.name or self.kind


class StageConfig(_Model):
    """One stage of the stage-to-value mapping that people edit."""

    name: str
    crm_values: list[str] = Field(min_length=1)
    field: str | None = Field(
        None, description="CRM property the values live in; default: lead or deal stage property"
    )
    macro: bool = False
    value: ValueRule = 0.0
    default_value: float | None = Field(
        None, ge=0, description="used when value = 'deal_amount' and the deal has no amount"
    )
    currency: str = "USD"
    destinations: dict[str, str] = Field(
        default_factory=dict,
        description="destination name -> conversion action (id, event name, goal or rule id)",
    )
    min_value: float = Field(0.0, description="a value below this is held (value_out_of_range)")
    max_value: float = Field(
        100_000_000.0, description="a value above this is held (value_out_of_range), e.g. a typo"
    )

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z]{3}", v):
            raise ValueError("must be a 3-letter ISO 4217 code such as EUR")
        return v.upper()

    @field_validator("value")
    @classmethod
    def _non_negative(cls, v: ValueRule) -> ValueRule:
        if isinstance(v, float) and v < 0:
            raise ValueError("must be >= 0, 'deal_amount' or 'predicted'")
        return v


class MicroConversionConfig(_Model):
    """A micro-conversion and how to recognise it in CRM data.

    Exactly one of: `property` (a CRM property/column that is set, truthy, or a date when it
    happened), `event` (an activity record type), or `expr` (a condition over lead columns in
    leadloop's expression language, `leadloop.expr`; checked here, at load).
    """

    name: str
    property: str | None = None
    event: str | None = None
    expr: str | None = None
    description: str | None = None
    role: MicroRole | None = Field(
        None, description="your decision (the workbench sets it); validation recommends one"
    )

    @field_validator("expr")
    @classmethod
    def _safe_expression(cls, v: str | None) -> str | None:
        if v is not None:
            parse_expression(v)  # ExpressionError is a ValueError: one line naming the token
        return v

    @model_validator(mode="after")
    def _one_way(self) -> MicroConversionConfig:
        ways = [w for w in (self.property, self.event, self.expr) if w]
        if len(ways) != 1:
            raise ValueError("set exactly one of property, event or expr")
        return self


# One `[destinations.<name>]` section: the config model of its `kind`'s destination class (each
# declares its own keys, see leadloop/export/base.py `DestinationSettings`). `kind` defaults to
# the section name (`Settings._kind_from_name`).
if TYPE_CHECKING:  # the union is built from the registry at run time; every member is one
    DestinationConfig = DestinationSettings
else:
    DestinationConfig = Annotated[
        Union[tuple(cls.config_model for cls in DESTINATIONS.values())],  # noqa: UP007
        Field(discriminator="kind"),
    ]


def parse_schedule(value: str) -> timedelta | str:
    """Return a timedelta for "30s"/"15m"/"6h"/"1d", or the cron string if it is one."""
    m = _INTERVAL.match(value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        if n <= 0:
            raise ValueError("interval must be positive")
        return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: n})
    fields = value.split()
    if len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields):
        return value
    raise ValueError(f"{value!r} is neither an interval like '15m' nor a 5-field cron expression")


class ScheduleConfig(_Model):
    sync: str | None = "15m"
    score: str | None = "1h"
    validate_: str | None = Field("6h", alias="validate")
    export: str | None = "15m"
    retrain: str | None = "0 3 * * 1"
    report: str | None = "0 7 * * 1"
    misfire_grace_seconds: int = Field(300, ge=1)
    lease_seconds: int = Field(
        60, ge=2, description="daemon lease lifetime; a crashed daemon's lease frees after this"
    )
    stop_timeout_seconds: int = Field(
        120, ge=1, description="on SIGTERM, how long the job in flight may take to finish its batch"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("sync", "score", "validate_", "export", "retrain", "report")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_schedule(v)
        return v

    def jobs(self) -> dict[str, str]:
        """Job name -> schedule string, for the jobs that are scheduled."""
        pairs = {
            "sync": self.sync,
            "score": self.score,
            "validate": self.validate_,
            "export": self.export,
            "retrain": self.retrain,
            "report": self.report,
        }
        return {k: v for k, v in pairs.items() if v}


class ModelConfig(_Model):
    dir: str = "models"
    horizon_days: int = Field(90, ge=1)
    min_leads: int = Field(1000, ge=1)
    min_conversions: int = Field(120, ge=1)
    leaky_fields: list[str] = Field(default_factory=list)
    features: list[str] | None = Field(None, description="lead attributes used; default: all")
    random_state: int = 0
    value_bands: bool = True
    max_training_rows: int = Field(
        200_000, ge=1000, description="train on the most recent decided leads only, to bound memory"
    )
    threads: int | None = Field(
        None, ge=1, description="BLAS/OpenMP threads for fitting; default: the cores not busy"
    )


class ValidationConfig(_Model):
    min_leads_per_group: int = Field(30, ge=1)
    min_events: int = Field(10, ge=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    trend_lag_weeks: int = Field(2, ge=0)
    window_days: int = Field(30, ge=1)  # micro-conversions count in the same first days for all
    segment_by: list[str] = Field(default_factory=lambda: ["utm_source", "utm_campaign"])


class ReportConfig(_Model):
    out_dir: str = "reports"
    min_conversions_per_30d: int = Field(30, ge=1)
    ad_spend: str | None = Field(
        None, description="CSV of ad spend per month, source and campaign (see report/spend.py)"
    )


class HealthConfig(_Model):
    port: int | None = Field(None, ge=1, le=65535)
    host: Literal["127.0.0.1", "::1", "localhost"] = "127.0.0.1"


class Settings(_Model):
    """The whole validated configuration."""

    database: DatabaseConfig = DatabaseConfig()
    crm: CrmConfig
    stages: list[StageConfig] = Field(min_length=1)
    micro_conversions: list[MicroConversionConfig] = Field(default_factory=list)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    schedule: ScheduleConfig = ScheduleConfig()
    model: ModelConfig = ModelConfig()
    validation: ValidationConfig = ValidationConfig()
    report: ReportConfig = ReportConfig()
    health: HealthConfig = HealthConfig()
    base_dir: Path = Field(Path("."), exclude=True, description="directory of the config file")

    @field_validator("destinations", mode="before")
    @classmethod
    def _kind_from_name(cls, value: Any) -> Any:
        """A section without `kind` is the platform it is named after."""
        if not isinstance(value, dict):
            return value
        return {name: {"kind": name, **section} if isinstance(section, dict) and "kind" not in section
                else section for name, section in value.items()}

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        names = [s.name for s in self.stages]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {sorted(dupes)}")
        if not any(s.macro for s in self.stages):
            raise ValueError("one stage must have macro = true (the macro conversion)")
        for i, stage in enumerate(self.stages):
            for dest in stage.destinations:
                if dest not in self.destinations:
                    raise ValueError(
                        f"stages[{i}].destinations names {dest!r}, which has no "
                        f"[destinations.{dest}] section"
                    )
        micro = [m.name for m in self.micro_conversions]
        if len(set(micro)) != len(micro):
            raise ValueError("micro_conversions names must be unique")
        return self

    # -- helpers -----------------------------------------------------------------------------

    @property
    def macro_stage(self) -> StageConfig:
        return next(s for s in self.stages if s.macro)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def snapshot_export(self) -> bool:
        """Time mode "snapshot": a CSV export with no creation times (no `[crm.csv]
        created_column`). Its leads, and their flag stages and micro-conversions, are dated by
        the file's modification time when first seen (marked `time_estimated`), so a lead's age
        and the order of its events say nothing: scoring must not leave leads out by
        `[model] horizon_days`, and judges the model by cross-validation rather than a
        time-ordered holdout. Every other source is time mode "dated"."""
        return self.crm.kind == "csv" and self.crm.csv is not None and not self.crm.csv.created_column

    def destination_kind(self, name: str) -> str:
        return self.destinations[name].kind

    def resolve_path(self, path: str | Path) -> Path:
        """Paths in the config are relative to the config file's directory."""
        p = Path(path)
        return p if p.is_absolute() else (self.base_dir / p)

    def secret(self, key: str, env_var: str | None) -> SecretStr:
        """Read a secret from the environment variable the config names under `key`."""
        if not env_var:
            raise ConfigError(key, "is required for this connector (the NAME of an env var)")
        value = os.environ.get(env_var)
        if not value:
            raise MissingSecretError(key, env_var)
        register_secret(value)
        return SecretStr(value)


def _key_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 2 and loc[0] == "destinations" and item in DESTINATIONS:
            continue  # the discriminator's tag: destinations.<name>.<kind>.<key>
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("float", "constrained-float", "literal['deal_amount','predicted']"):
            continue
        else:
            parts.append("validate" if item == "validate_" else str(item))
    return ".".join(parts) or "(top level)"


def _sqlite_url_against(url: str, base_dir: Path) -> str:
    """A SQLite URL whose file path is relative, made absolute against `base_dir`."""
    scheme, sep, rest = url.partition(":///")
    if not sep or not scheme.startswith("sqlite"):
        return url  # PostgreSQL, or `sqlite://` (in memory)
    path, query_sep, query = rest.partition("?")
    if path in ("", ":memory:") or path.startswith("file:"):
        return url
    return f"{scheme}:///{_against(path, base_dir)}{query_sep}{query}"


def _against(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def anchor_paths(settings: Settings, base_dir: Path) -> Settings:
    """The settings with every relative path made absolute against `base_dir` (the config
    file's folder): the database file, the CSV export and its join, the model and report
    folders, and each destination's output folder. One rule for all of them, so every command
    reads the same store, model and files whatever the working directory."""
    csv_mapping = settings.crm.csv
    if csv_mapping is not None:
        join = csv_mapping.join
        csv_mapping = csv_mapping.model_copy(update={
            "path": str(_against(csv_mapping.path, base_dir)),
            "join": join and join.model_copy(update={"path": str(_against(join.path, base_dir))}),
        })
    destinations = {name: dest.anchored(lambda path: str(_against(path, base_dir)))
                    for name, dest in settings.destinations.items()}
    return settings.model_copy(update={
        "database": settings.database.model_copy(
            update={"url": _sqlite_url_against(settings.database.url, base_dir)}),
        "crm": settings.crm.model_copy(update={"csv": csv_mapping}),
        "model": settings.model.model_copy(
            update={"dir": str(_against(settings.model.dir, base_dir))}),
        "report": settings.report.model_copy(
            update={"out_dir": str(_against(settings.report.out_dir, base_dir))}),
        "destinations": destinations,
        "base_dir": base_dir,
    })


def settings_from_dict(
    data: dict[str, Any], *, source: str = "<config>", base_dir: Path | None = None
) -> Settings:
    """Validate a parsed TOML document; raise `ConfigErrors` naming every bad key.

    With `base_dir` (the config file's folder), every relative path in it is resolved against
    that folder (see `anchor_paths`)."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        errors: list[ConfigError] = []
        seen: set[str] = set()
        for err in exc.errors():
            key = _key_path(tuple(err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against config/leadloop.example.toml)"
            line = f"{key}: {msg}"
            if line in seen:
                continue
            seen.add(line)
            errors.append(ConfigError(key, msg))
        raise ConfigErrors(source, errors) from None
    return settings if base_dir is None else anchor_paths(settings, base_dir.resolve())


def load_settings(path: str | Path) -> Settings:
    """Read and validate a config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigErrors(str(p), [ConfigError("(file)", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigErrors(str(p), [ConfigError("(file)", f"not valid TOML: {exc}")]) from None
    return settings_from_dict(data, source=str(p), base_dir=p.resolve().parent)
