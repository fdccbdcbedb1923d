"""What a task name may be: letters, digits, `._-`, starting with a letter or digit, at most 128."""

from __future__ import annotations

import re

TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_task_name(name: object) -> bool:
    """Whether `name` is a valid task name."""
    return isinstance(name, str) and TASK_NAME_RE.match(name) is not None
