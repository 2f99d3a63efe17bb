"""Serving: uvicorn on sockets bound first (``serving``), worker processes (``workers``), what a client connection
may cost (``limits``), and a response's head and body in one write (``coalesce``)."""
