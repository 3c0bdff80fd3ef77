"""What operators watch: Prometheus metrics (``metrics``), journald fields (``journald``) and the live status
page with its JSON and SSE feeds (``web``, files in ``static/``)."""
