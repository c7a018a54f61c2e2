"""Errors about one argument, worded for both callers: from Python they name the parameter
("temperature must be ..."); dgq_cli.user_errors puts the command's flag in its place
("--temperature must be ...") when the command has an option of that name."""
from __future__ import annotations


def param_error(cls: type[Exception], param: str, detail: str) -> Exception:
    """cls(f"{param} {detail}") that remembers `param`, the Python name of the argument."""
    e = cls(f"{param} {detail}")
    e.param = param
    return e
