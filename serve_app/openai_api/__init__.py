"""The OpenAI-compatible API: request parsing (`protocol`), response encoding (`encoding`) and
the service that runs `/v1/chat/completions` on ChatStream's admission (`service`)."""
