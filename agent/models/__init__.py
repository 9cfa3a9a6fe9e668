"""Model lifecycle: runtimes, bundle manifests, the on-device store, validation."""
