"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong model, bad option value).

    The CLI prints ``Error: <message>`` and exits with ``exit_code`` (2, like Click's usage errors).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
