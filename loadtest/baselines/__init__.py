"""Reference servers that slimserve is measured against, each as small as it can honestly be."""
