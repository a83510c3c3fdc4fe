"""The operator's admin API: HTTP/1.1 on h11 in the edge's master process (admin port 8080).

``http`` is the server, ``api`` the route framework (dispatch, auth, validation, errors,
OpenAPI), ``auth`` the tokens, ``app`` the assembled application; one module per area of
the API (``regions``, ``nodes``, ``projects`` ...) declares its routes and models.
"""
