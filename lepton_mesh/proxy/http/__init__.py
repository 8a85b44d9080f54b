"""The HTTP/1.1 data path: the client connection, header rules, one exchange per request, upstream connections, listeners, mirrors."""
