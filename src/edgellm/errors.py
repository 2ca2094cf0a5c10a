"""Errors a user can act on.

Anything raised as EdgeLLMError is shown as one line (no traceback) and the CLI exits with
code 2. Everything else is a bug in edgellm and keeps its traceback.
"""


class EdgeLLMError(Exception):
    """A problem with the user's input (model files, flags, configuration, prompt)."""
