"""The shapes world: a procedural, seeded generator of captioned 64x64 images and 8-frame clips, with held-out
concepts (subjects, styles, motions) for customization benchmarks, and small detectors trained on its renders.

Modules: ``concepts`` (the registry and label types), ``render`` (drawing), ``clips`` (motion paths),
``captions`` (the caption grammar and its parser), ``dataset`` (seeded scene sampling and datasets),
``detectors`` (the networks, ``load_detectors``, ``detect``) and ``train_detectors`` (their training script).
"""
