"""The one exception type for user mistakes.

Every error a user can fix (a bad model reference, option, recipe or path) is a ``UserError`` whose
message names the problem and the fix. The CLI prints it as one ``error:`` line and exits with
status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input; the message says what is wrong and how to fix it."""
