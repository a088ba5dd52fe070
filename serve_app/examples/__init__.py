"""Runnable examples of the ChatStream facade in your own FastAPI routes."""
