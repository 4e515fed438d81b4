"""coft: few-shot visual inspection for factory camera lines.

The stages live in the repository's top-level folders and install under this one name:
`coft.train` (torch), `coft.export` (ONNX, TensorRT) and `coft.runtime` (the edge: no torch);
`coft.cli` is the command line, where the stages meet, and `coft.demo` runs them all once.
"""
