"""Training methods; importing this package registers every one of them in ``training.base.METHODS``."""

from training.methods import lora, motion_director, orthogonal, scedit, tlora  # noqa: F401
