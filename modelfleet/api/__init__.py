"""The HTTP API: app factory, routes, and error rendering."""
