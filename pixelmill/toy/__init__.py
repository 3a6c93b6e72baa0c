"""The toy world: small images with known ground truth, and small models trained on it.

Nobody can download Stable Diffusion or CLIP here, so quality is measured in a world
small enough to train on a CPU:

- ``world``: the seeded generator (32x32 images of one shape in one of six colours,
  plain or two-tone backgrounds, grammar captions, attribute labels; ``HELD_OUT_SHAPE``
  is never shown to the toy Stable Diffusion in training);
- ``detect``: frozen colour and shape detectors computed from pixels (no learning);
- ``dataset`` / ``cli``: ``pixelmill dataset toy --out DIR --rows N``;
- ``clip`` / ``train_clip``: the toy CLIP (open_clip architecture) and its training loop;
  the trained models ship under ``models/`` with a ``MODEL_CARD.md`` each and load as
  ``toy:NAME`` or by path through ``pixelmill.models``.
"""
