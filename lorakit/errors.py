"""The errors lorakit raises for problems a user can fix.

Library code raises these with a message that names the file, key or value and says what would
be valid; the CLI prints the message on one line and exits with code 2.
"""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a one-line error quotes."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class LorakitError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class RecipeError(LorakitError):
    """The recipe file or a `--set` override is invalid."""


class DatasetError(LorakitError):
    """The dataset folder is missing, empty or malformed."""


class ModelError(LorakitError):
    """The base model cannot be found or loaded."""


class AdapterError(LorakitError):
    """An adapter file is unreadable, of another architecture, or otherwise unusable."""


class OutputError(LorakitError):
    """The output location cannot be written, or would overwrite something."""


class Interrupted(LorakitError):
    """The user stopped a run (Ctrl-C, SIGTERM) and its progress was saved; the message says how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # 130 for SIGINT, 143 for SIGTERM: the shell's convention
