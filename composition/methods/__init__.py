"""Built-in composers; importing this package registers every one of them in ``COMPOSERS``."""

from composition.methods import merge

__all__ = ["merge"]
