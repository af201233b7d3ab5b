"""Config values that name an environment variable holding a secret (never the secret itself)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_env_name(value: str | None) -> str | None:
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError(
            "must be the NAME of an environment variable (letters, digits, _), not the secret"
        )
    return value


EnvName = Annotated[str, Field(description="name of an environment variable holding a secret")]
# The same, checked: a config key holding an env var's name.
CheckedEnvName = Annotated[EnvName, AfterValidator(check_env_name)]
