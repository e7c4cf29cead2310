"""Ray is an optional extra: importing it goes through here, so its absence is one clear sentence."""

from __future__ import annotations

from types import ModuleType

from langchain_adaptquant.errors import AdaptQuantError

EXTRA = "ray"
INSTALL = "pip install 'langchain-adaptquant[ray]'"


class RayNotInstalledError(AdaptQuantError, ImportError):
    """Ray Serve is needed (``serve --ray``, ``serve_ray.build_app``) but not installed."""


def import_ray() -> tuple[ModuleType, ModuleType]:
    """``(ray, ray.serve)``, or :class:`RayNotInstalledError` naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise RayNotInstalledError(
            f"Ray Serve is not installed ({error}); serving on Ray needs the {EXTRA!r} extra: {INSTALL}"
        ) from None
    return ray, serve
