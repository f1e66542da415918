"""Goldens: recorded evidence a run is compared with. common (errors, paths, header, provenance, writing),
model (model-metric goldens, ModelRegression), episodes (LIBERO outcome goldens, SuccessRegression)."""
