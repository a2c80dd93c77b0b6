"""The HTTP routes, one module per resource; assembled in service/app.py."""
