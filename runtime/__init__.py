"""The edge runtime, torch-free, in rooms: model/ (the bundle contract), engines/ (one backend per file),
cameras/ (frames in), line/ (judging a part), comms/ (the plant), box/ (what the command line manages);
pipeline.py is the composition root that joins them, config.py the one YAML config."""

__all__ = ["box", "cameras", "comms", "config", "engines", "line", "model", "pipeline"]
