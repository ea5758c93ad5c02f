"""Serving trained models: an OpenAI-compatible HTTP API on Ray Serve (``app.py``) and the API's requests and
replies (``openai_api.py``)."""
