"""The pull-through policy: manifests, blobs and their fills, pull-ahead, and the sync list.
`service.MirrorService` is what the HTTP layer talks to."""
