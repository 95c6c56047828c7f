"""The errors a person running diffemb can fix, told apart from the project's own bugs.

Every refusal of user input (a flag, a config key, a file, a checkpoint) raises a `UserError`; the
CLI prints its message and exits 2, and lets anything else, an internal bug, keep its traceback.
`UserError` is a ValueError, so library callers that catch ValueError keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """Input the tool cannot honour; the message names the file, line, key or flag and says what to do."""


class ConfigError(UserError):
    """A config key, option or flag with a value the tool does not offer."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named is not there."""


class PathExistsError(UserError, FileExistsError):
    """An output the user named is there already and would be overwritten."""


def check_choice(name: str, value, choices: Iterable) -> None:
    """ConfigError naming `name` unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not offered; choose one of {', '.join(map(str, choices))}")
