"""The errors a user can act on. The CLI prints them as one line (no traceback unless --debug)."""


class FusionError(Exception):
    """Base class: bad input or a failed precondition, with a message naming the thing at fault."""
