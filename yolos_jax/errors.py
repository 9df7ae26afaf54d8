"""`UserError`: a situation the user can fix, reported as one line by the entry scripts (no traceback).

Raised for what a run can foresee: a workdir another run holds, checkpoints that do not restore or cannot be
written, a non-finite loss, a config value that cannot work (`ConfigError`), a path that holds nothing usable
(`MissingInputError`), a file that cannot serve (`UnusableInputError`), bad data (`data.DataError`). The message
says what happened, where (the file, step or field) and what to do.
`describe_error` turns a storage library's exception (orbax, TensorStore: many lines, often a spec dump)
into the one line such a message quotes.
"""

from __future__ import annotations

import re

_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")  # an absl::Status message, e.g. 'OUT_OF_RANGE: Error reading ...'
# TensorStore appends payloads to a status line: " [tensorstore_spec='{...}']" (the whole spec, often longer than the
# line a message may quote) and " [source locations='...']"; they say nothing a user can act on, and cutting the
# middle of a line that ends in one dropped the reason before it ('... File too large'). The OS error code stays.
_PAYLOAD = re.compile(r" \[(?!os_error_code)[A-Za-z_ ]+='(?:[^'\\]|\\.)*'\]")


class UserError(Exception):
    """An error whose message is the whole report: the entry scripts print it in one line and exit 1."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (a field, a split name, a class count): the message names the field
    (`config.input.train_split`) and what to set. A ValueError too, for callers that validate values."""


class MissingInputError(UserError, FileNotFoundError):
    """A path the user gave that holds nothing usable (no checkpoint, no images): the message names the path and
    what was expected there. A FileNotFoundError too."""


class UnusableInputError(UserError, ValueError):
    """A file or directory the user gave whose contents cannot serve (an older converted format, a backbone where a
    detector is needed, an unreadable image): the message names it and what to do. A ValueError too."""


def describe_error(error: BaseException, limit: int = 300) -> str:
    """One line for `error`: the most specific message of its cause chain (TensorStore's status line when
    there is one, e.g. 'OUT_OF_RANGE: Error reading "a/0" ...'), its exception type when the message is
    not self-explaining, at most `limit` characters (the middle of a longer one is cut). A `UserError`'s own
    message is returned whole, in one line."""
    if isinstance(error, UserError):  # its message is the whole report, written to be quoted as it is
        return " ".join(str(error).split("\n")).strip() or type(error).__name__
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    best = next((e for e in reversed(chain) if _STATUS.match(str(e))), None)
    if best is None:
        best = next((e for e in chain if str(e).strip()), error)
    lines = str(best).strip().splitlines()
    text = _PAYLOAD.sub("", lines[0]).strip() if lines else ""
    if not _STATUS.match(text):
        text = f"{type(best).__name__}: {text}" if text else type(best).__name__
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2  # the head says what failed, the tail why (e.g. 'File too large [os_error_code=27]')
    return f"{text[:half]} ... {text[-half:]}"
