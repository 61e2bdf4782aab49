"""The one exception type for mistakes a user can fix (bad data, bad config, missing upstream stage).

The CLI catches it, prints its message without a traceback and exits non-zero, so every message must
name the file or key at fault and say how to fix it.
"""


class SamoraError(Exception):
    """A user-fixable problem; the message is shown to the user as is."""
