"""A local Ray listens on 127.0.0.1 only, unless the user joins a cluster.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported in a process;
``0`` then binds GCS, the raylet, the workers and the driver to loopback. Set later it changes
nothing, so every entry point that may start a local Ray calls :func:`loopback_default` before its
first ``import ray`` (this module also does it when imported). A cluster (``address`` or
``RAY_ADDRESS``) needs the node's reachable address instead, and a value the user set is theirs.
"""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["ENV", "loopback_default"]

ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_set_here = False  # True while the variable's value is ours (so a later cluster address may take it back)


def loopback_default(address: str | None = None) -> None:
    """Default ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` for a local Ray; leave it unset for a cluster.
    Warns when ``ray`` was already imported with the other setting, since it is then too late."""
    global _set_here
    cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    if cluster and _set_here:
        os.environ.pop(ENV, None)
        _set_here = False
    elif not cluster and ENV not in os.environ:
        os.environ[ENV] = "0"
        _set_here = True
    if "ray" not in sys.modules:
        return
    constants = sys.modules.get("ray._private.ray_constants")
    binds_everywhere = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if binds_everywhere is None:
        return
    if not cluster and binds_everywhere and os.environ.get(ENV) == "0":
        warnings.warn(f"ray was imported before fairsweep could set {ENV}=0, so a local Ray started by this process "
                      f"listens on every network interface; set {ENV}=0 in the environment (or import orchestrator "
                      f"before ray) to keep it on 127.0.0.1", RuntimeWarning, stacklevel=2)
    elif cluster and not binds_everywhere and os.environ.get(ENV) != "0":  # a 0 the user set is their choice
        warnings.warn(f"ray was imported with {ENV}=0 (loopback only), so this driver registers as 127.0.0.1 and "
                      f"nodes of the cluster at {address or os.environ.get('RAY_ADDRESS')} cannot reach it; set "
                      f"RAY_ADDRESS before importing orchestrator or ray, or start a new process", RuntimeWarning,
                      stacklevel=2)


loopback_default()
