"""The composition root: the aiohttp app, its lifecycle, both directions wired, reload."""
