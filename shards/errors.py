"""The project's one error type.

Library code raises `SigmaError` for a mistake the user can fix (a flag, a config key, an input
file); entry points turn it into one line naming the item and the reason, and a non-zero exit
status (`common.cli.user_errors`). Anything else is a bug and keeps its traceback.
"""

import errno
import os


class SigmaError(Exception):
    """A user-fixable problem; its message names the item (key, file, flag) and the reason."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: object) -> str:
    return f"{path}: disk full ({os.strerror(errno.ENOSPC)}); free space and rerun: finished parts are kept"


def user_message(error: BaseException) -> str | None:
    """The one line for a user-fixable error, also when Ray wrapped it (a task's cause, a chained
    exception): a SigmaError's message, or a full disk naming the file; None for a bug."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError: its str is a whole traceback
        if isinstance(cause, BaseException):
            e = cause
            continue
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            # Ray Data's retry wrapper appends its advice to the args, where OSError reads a filename
            name = e.filename if isinstance(e.filename, str) and "\n" not in e.filename else None
            return disk_full(name or "output")
        if isinstance(e, SigmaError):
            return str(e).splitlines()[0] if str(e) else type(e).__name__
        e = e.__cause__ or e.__context__
    return None
