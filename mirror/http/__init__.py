"""The registry API over HTTP: app wiring, routes, the error table, zero-copy sending."""
