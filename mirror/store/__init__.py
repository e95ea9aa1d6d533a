"""The cache on disk: content-addressed blobs, manifests and tag records."""
