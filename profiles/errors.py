"""The one exception type of the project.

Every user-facing failure (bad image, unknown profile, missing weights, stale artifact that cannot be rebuilt)
raises `ControlNetRTError` with a message that names the fix, so callers catch one type and users read one line.
"""


class ControlNetRTError(Exception):
    """A failure the user can act on; the message says what to do."""
