"""didomi-braze-gateway: keeps Braze in step with the consent choices people make in Didomi."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("didomi-braze-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
