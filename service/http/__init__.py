"""The HTTP transport: the lean v2 REST app, the friendly JSON endpoints and the BentoML service
that hosts both. Thin codecs over :mod:`service.serving.dataplane`."""
