"""The one exception type users see: a one-line message that says what, where and how to fix."""


class SoftPromptError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with code 2."""
