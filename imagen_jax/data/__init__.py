"""Datasets (the shapes demo set, folders, webdataset, TFDS) and grain input pipelines."""
