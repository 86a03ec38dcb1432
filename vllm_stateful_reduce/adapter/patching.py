"""Marks on what the plugin put in place of a vLLM function, so `register()` run again
(every process, and tests) does not wrap twice, and tests can tell a wrapper apart."""

from collections.abc import Callable


def mark_installed(wrapper: Callable) -> None:
    """Tag a wrapper the plugin put in place of a vLLM function, so `register()` run again
    (every process, and tests) does not wrap it twice."""
    wrapper.__dict__["_stateful_reduce"] = True


def is_installed(function: object) -> bool:
    return getattr(function, "_stateful_reduce", False)
