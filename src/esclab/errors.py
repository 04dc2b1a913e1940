"""The one error type a user can cause and fix.

Every message names the file or setting at fault and what to do about it; the
command-line entry points print it as one line and exit non-zero.
"""


class EsclabError(Exception):
    """A problem with the user's data, config or environment, with its fix in the message."""
