"""The method registry and the built-in methods."""
from . import builtin, pai, second_order, wanda  # noqa: F401  (each module registers its methods)
from .registry import (MethodSpec, ScoreContext, get_method, get_updater, hparam, list_methods, list_updaters,
                       register_method, register_updater)

__all__ = ["MethodSpec", "ScoreContext", "get_method", "get_updater", "hparam", "list_methods", "list_updaters",
           "register_method", "register_updater"]
