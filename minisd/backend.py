"""Transition shim (goes once no file imports it): the backends are minisd/backends/ now."""

from minisd.backends import (  # noqa: F401
    BACKENDS, Backend, BackendUnavailable, get_array_module, get_backend, set_backend, to_numpy)
