"""The ``cuga`` command line."""
