"""Serving a cascade: the batching sampling worker (`batcher`), its HTTP API and web page
(`api`, static/), its metrics (`metrics`), and running it until SIGTERM (`server`)."""
