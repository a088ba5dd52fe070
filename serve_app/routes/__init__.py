"""Thin FastAPI routers of ChatStream's own ingress. Each route looks its service up on
`request.app.state` (set when the ingress replica starts) and makes one call; each router
declares the edge's guard of its routes (`GUARDS`)."""
