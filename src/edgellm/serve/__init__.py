"""`edgellm serve`: an OpenAI-compatible server (app.py: HTTP and the API's shapes; protocol.py:
request bodies; scheduler.py: sessions stepped together, calls batched; structured.py: JSON
answers; metrics.py: /metrics)."""
