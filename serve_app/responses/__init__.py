"""OpenAI's Responses API (`/v1/responses`) on ChatStream's sessions: see service.py."""
