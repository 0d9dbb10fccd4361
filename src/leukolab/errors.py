"""User-facing errors.

Every problem a user can cause (bad path, bad option, corrupt image, a
checkpoint that does not fit) is raised as :class:`LeukolabError` with a
one-line message naming the file or value and what was expected. The CLI turns
it into ``error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class LeukolabError(Exception):
    """An error caused by the user's input; its message is shown as one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
