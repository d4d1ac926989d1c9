"""Built-in composers; importing this package registers every one of them in ``COMPOSERS``."""

from composition.methods import clora, cmlora, composite, merge, switch

__all__ = ["clora", "cmlora", "composite", "merge", "switch"]
