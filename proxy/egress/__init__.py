"""The way out to Cognito and API Gateway: the egress proxy a URL goes through (``route``), what a failure on
the way means (``failures``), TLS trust and client certificates (``tls``), the upstreams' HTTP client
(``client``), and the token endpoint's (``transport``)."""
