"""The non-proxy HTTP edge: health, metrics, admin API."""
