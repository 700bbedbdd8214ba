"""User-facing errors.

Library code raises :class:`UserError` for anything the user can fix (bad file, bad flag,
bad recipe). The CLI maps it, in one place, to a single line on stderr and exit code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; the message says what is wrong and what to do.

    ``where`` names the file or flag at fault; it is prefixed to the message.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)
