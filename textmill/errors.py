"""The one exception type for user mistakes: the CLI prints it as a single line and exits 2, never a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad config, bad input file). The message says what and how.

    Raise it with the file (and line/row where there is one) and the fix, e.g.
    ``UserError(f"{path}:{line}: malformed CSV row (unclosed quote); fix the row or pass --format tsv")``.
    """
