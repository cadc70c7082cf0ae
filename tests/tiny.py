"""The tiny synthetic Market-format set the integration tests train on (16 identities, 3 cameras,
6 images each, at 64x32): a training step takes milliseconds on a CPU. As ``--set`` overrides of
``configs/synthetic/bot.yaml``; each test adds its own settings to these."""

TINY_DATA = [
    "data.synthetic.ids=16",
    "data.synthetic.cams=3",
    "data.synthetic.images_per_id=6",
    "data.synthetic.distractors=4",
    "data.synthetic.junk=2",
    "data.height=64",
    "data.width=32",
]

#: Batches of 2 identities x 2 images, read in the test process; evaluation 32 images at a time.
TINY_BATCH = [
    "sampler.num_identities=2",
    "sampler.num_instances=2",
    "loader.num_workers=0",
    "loader.test_batch_size=32",
]
#: 3 epochs, the first a warm-up, the learning rate dropping after the second.
TINY_SCHEDULE = ["schedule.epochs=3", "schedule.milestones=[2]", "schedule.warmup_epochs=1"]
