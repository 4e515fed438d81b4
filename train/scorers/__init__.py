"""How a bundle scores a part, fitted on the shots: a Gaussian of global embeddings, a patch Gaussian, or the
knn memory bank (the default)."""
