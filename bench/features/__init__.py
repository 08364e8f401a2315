"""Feature extractors for IS/FID/KID/precision/recall: Inception pool3 (the published features; see
`bench.features.inception` and `bench.features.select`) or the project's own domain classifier. All are
torch-fidelity `FeatureExtractorBase`s."""


def describe_extractor(fe: dict) -> str:
    """A record's ``protocol.feature_extractor`` in a few words, naming IS's extractor when it differs."""
    name = fe.get("name", "?")
    if fe.get("isc_kind") and fe.get("isc_kind") != fe.get("kind"):
        return f"{name} (IS: {fe.get('isc_name', '?')}, {fe['isc_kind']})"
    return name
