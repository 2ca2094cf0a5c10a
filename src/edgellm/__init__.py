"""edgellm: compile small language models into fast, small artifacts and run them."""

__version__ = "0.1.0"


def load(path, threads: int | None = None):
    """Load a compiled output directory; returns an edgellm.runtime.model.Model."""
    from .runtime.model import Model

    return Model.load(path, threads=threads)
