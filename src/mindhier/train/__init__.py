"""Training loops and their command-line entry points (never imported by the library)."""
