"""didomi-braze-gateway: keeps Braze in step with the consent choices people make in Didomi."""

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up when first asked for: importlib.metadata costs tens of milliseconds, and the
    # `gateway` command guards Ctrl-C only once this package has been imported (`__main__`).
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("didomi-braze-gateway")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        value = "0.0.0+unknown"
    globals()["__version__"] = value
    return value
