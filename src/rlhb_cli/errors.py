"""The one error a user sees: a single line that says what is wrong and where, never a traceback."""


class RlhbError(Exception):
    """A problem with the user's input or run directory, reported as one line by the CLI."""


def where(path, line=None, field=None) -> str:
    """`file:line: field 'x'` prefix for messages about a place in a user's file."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field '{field}'"
    return text
