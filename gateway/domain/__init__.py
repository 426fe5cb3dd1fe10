"""What a request is, independent of who carries it: every layer may import from here.

`Exchange` is one request's record in the making, `RequestView` the few fields the gateway
reads from a client's body. Nothing here imports from another gateway package.
"""

# The one endpoint a route's local model can answer (and fail over to).
LOCAL_ENDPOINT = "/v1/chat/completions"
