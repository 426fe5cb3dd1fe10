"""The non-proxy HTTP edge: health, metrics, the admin API and the dashboard."""
