"""Messages fit for a public endpoint (/health, 503 details): what is wrong, never where on disk.

The full message goes to the log where it is raised; what is kept for clients has absolute paths
masked, non-printable characters replaced and a bounded length.
"""
from __future__ import annotations

import re

PUBLIC_ERROR_MAX_CHARS = 300
# an absolute path (POSIX or Windows) at the start of the text or after a separator
_ABS_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s'"(=:,\[]))(?:/|[A-Za-z]:\\)[^\s'",)\]]*""")


def public_error(message: str | None) -> str | None:
    """A message fit for a public endpoint: absolute paths masked, bounded length."""
    if message is None:
        return None
    text = _ABS_PATH.sub("<path>", str(message))
    text = "".join(c if c.isprintable() else " " for c in text)
    if len(text) > PUBLIC_ERROR_MAX_CHARS:
        text = text[:PUBLIC_ERROR_MAX_CHARS - 3] + "..."
    return text
