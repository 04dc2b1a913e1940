"""The one error type a user can cause and fix.

Every message names the file or setting at fault and what to do about it; the
command-line entry points print it as one line and exit non-zero.
"""


class EsclabError(Exception):
    """A problem with the user's data, config or environment, with its fix in the message."""


def examples(values) -> str:
    """A few of `values` for a one-line message, sorted: 'a, b, c, d, e and 7 more'."""
    values = sorted(map(str, values))
    more = f" and {len(values) - 5} more" if len(values) > 5 else ""
    return ", ".join(values[:5]) + more
