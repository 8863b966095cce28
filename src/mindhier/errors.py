"""The one base class for errors that are the user's to fix (bad file, bad shape, bad flag).

The CLI prints these as one clear message instead of a traceback; everything else is a bug
and keeps its traceback.
"""


class MindhierError(Exception):
    """An error in the user's input: its message names the file, what is wrong, and the fix."""
