"""Feature extractors for IS/FID/KID: torch-fidelity's Inception when its weights are on disk, otherwise
the project's own domain classifier. Both are torch-fidelity `FeatureExtractorBase`s."""
