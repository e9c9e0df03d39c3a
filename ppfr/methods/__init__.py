"""Method plugins: ``build_method(name, **options)``; see ppfr.methods.base for the protocol.

A method that lives outside ppfr registers itself the way any installed plugin does: its package declares an entry
point in the group ``ppfr.methods`` naming the module that holds its ``@register_method`` class, e.g. in its
pyproject.toml ``[project.entry-points."ppfr.methods"] mymethod = "mypkg.mymethod"``. Those modules are imported
here, once, so every verb (``ppfr train``, ``eval``, ``attack``, ``export``, ``serve``) finds the method by name in
any process. docs/adding-a-method.md is the whole checklist.
"""

from ppfr.methods.base import (
    FreqPayloadOperator, Method, MethodOptions, Payload, Stage, TensorSpec, available_methods, build_method,
    load_method, method_class, register_method,
)  # fmt: skip

PLUGIN_GROUP = "ppfr.methods"


def load_plugins() -> list[str]:
    """Import the modules of the ``ppfr.methods`` entry points (each registers its methods); return their names.

    A plugin that fails to import is skipped with a warning naming it, so one broken package cannot take every
    verb down with it; asking for its method then fails as for any unknown name.
    """
    import warnings
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 -- any import failure of third-party code
            warnings.warn(f"ppfr method plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}",
                          stacklevel=2)  # fmt: skip
            continue
        loaded.append(ep.name)
    return loaded


__all__ = ["PLUGIN_GROUP", "FreqPayloadOperator", "Method", "MethodOptions", "Payload", "Stage", "TensorSpec",
           "available_methods", "build_method", "load_method", "load_plugins", "method_class",
           "register_method"]  # fmt: skip

# After every name above is bound: a plugin's ``from ppfr.methods import Method, register_method`` then works.
load_plugins()
