"""The edge runtime, torch-free, in rooms, each importing only those below it (pyproject.toml's layers contract):
pipeline.py, the composition root; box/ (what the command line manages); comms/ (the plant's protocols); line/
(judging a part, and the model switches of commissioning and learning); engines/ and cameras/; config.py (the
one YAML config); process/ (metrics, logs, the watchdog, the disk); model/ (the bundle contract)."""
