"""User-facing errors.

Anything a user can cause (a bad config, a broken data line, a missing path) raises `UserError`
with a message that says what is wrong, where, and what to do. The CLI prints it without a
traceback and exits with status 2.
"""


class UserError(Exception):
    """An error caused by user input; printed without a traceback."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text
