"""`last_error` fields that know when they were set.

Status shows each namespace's latest error with its time (`last_error_at`), and
the error clears once the part that reported it works again. A descriptor does
the stamping, so every `status.last_error = ...` in capture and apply records
the moment without a second assignment that could be forgotten.
"""

from __future__ import annotations

from typing import Any

from cosmigrate.clock import Wall


class LastError:
    """A dataclass field: assigning a message also sets the owner's `last_error_at` (now, or None when cleared).

    Declare `last_error_at: Wall | None = None` before the field, so that a message given to the
    constructor is stamped after the default was set.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        if obj is None:
            return ""  # the dataclass default
        return str(obj.__dict__.get(self._slot, ""))

    def __set__(self, obj: Any, value: str) -> None:
        obj.__dict__[self._slot] = value
        obj.__dict__["last_error_at"] = Wall.now() if value else None
