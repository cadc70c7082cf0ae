"""The tiny synthetic Market-format set the integration tests train on (16 identities, 3 cameras,
6 images each, at 64x32): a training step takes milliseconds on a CPU. As ``--set`` overrides of
``configs/synthetic/bot.yaml``; each test adds its sampler, schedule and logging settings."""

TINY_DATA = [
    "data.synthetic.ids=16",
    "data.synthetic.cams=3",
    "data.synthetic.images_per_id=6",
    "data.synthetic.distractors=4",
    "data.synthetic.junk=2",
    "data.height=64",
    "data.width=32",
]
