"""The one seam to upstream registries: routing, auth, HTTP. aiohttp errors stop here."""
