"""The project's one error type.

Library code raises `SigmaError` for a mistake the user can fix (a flag, a config key, an input
file); entry points turn it into one line naming the item and the reason, and a non-zero exit
status (`common.cli.user_errors`). Anything else is a bug and keeps its traceback.
"""


class SigmaError(Exception):
    """A user-fixable problem; its message names the item (key, file, flag) and the reason."""
