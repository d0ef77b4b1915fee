"""The bottom of the config tree: its error type, section base class and constrained number types.

Imports only msgspec: every other config module (and nothing else) builds on it.
"""
from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Meta(gt=0.0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]


class ConfigError(ValueError):
    """A user mistake in a config file or override, one line long."""


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A config section: frozen, and an unknown key is an error naming its path."""
