"""The control API of a running VM: an HTTP/1.1 server with JSON bodies on a Unix socket, and its client.

``server`` holds the routes (``mpvmm start --api-socket``), served by the
bounded server the metrics endpoint uses too (mpvmm/http_server.py);
``client`` is what ``mpvmm ctl`` sends; ``unix_socket`` binds a private
socket path (the API's, and ``--incoming unix:PATH``'s).
"""
