"""One exception type for mistakes a user can fix; the CLI prints it as a single line."""


class UserError(Exception):
    """Bad input or configuration: the message says what is wrong and how to fix it."""
