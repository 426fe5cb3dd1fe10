"""The transparent proxy: the /v1/* edge, the request view, stream assembly, forwarding."""
