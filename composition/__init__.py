"""Multi-adapter composition at sampling time: the composer contract, the built-in composers and the sampler."""

import composition.methods  # noqa: F401  (registers the built-in composers)
