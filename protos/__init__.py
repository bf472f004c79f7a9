"""Protocol buffer definitions; the Python stubs are generated at install time (see setup.py)."""
