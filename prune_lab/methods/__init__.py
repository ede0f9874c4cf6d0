"""The method registry and the built-in methods."""
from . import builtin  # noqa: F401  (registers the built-in methods)
from .registry import MethodSpec, ScoreContext, get_method, hparam, list_methods, register_method

__all__ = ["MethodSpec", "ScoreContext", "get_method", "hparam", "list_methods", "register_method"]
