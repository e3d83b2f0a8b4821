"""Static build profiles (shapes, precision) and the project's exception type."""

from profiles.config import (
    DEFAULT_PROFILE,
    NUM_CONTROLS,
    PROFILES,
    REFERENCE_PROFILE,
    Backend,
    Precision,
    Profile,
    get_profile,
    reference_of,
)
from profiles.errors import ControlNetRTError

__all__ = [
    "DEFAULT_PROFILE",
    "NUM_CONTROLS",
    "PROFILES",
    "REFERENCE_PROFILE",
    "Backend",
    "ControlNetRTError",
    "Precision",
    "Profile",
    "get_profile",
    "reference_of",
]
