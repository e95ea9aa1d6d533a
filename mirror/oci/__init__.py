"""The OCI distribution spec's vocabulary: names, references, media types, digests. Pure, no I/O."""
