"""The gateway's side of the local model: supervising the backend process and calling it."""
