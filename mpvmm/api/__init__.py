"""The control API of a running VM: an HTTP/1.1 server with JSON bodies on a Unix socket, and its client.

``http_server`` is the bounded server, ``server`` the routes (``mpvmm start
--api-socket``), ``client`` what ``mpvmm ctl`` sends; ``unix_socket`` binds
a private socket path (the API's, and ``--incoming unix:PATH``'s).
"""
