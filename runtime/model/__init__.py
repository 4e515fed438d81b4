"""The model contract, torch-free: the bundle and its manifest, how a part is scored, images in, anomaly maps out,
the threshold's fits and promise, the bank's growth. train/ and export/ import only this room (and errors)."""
