"""gRPC service definitions (``*.proto``) and the modules generated from them
(``make`` regenerates ``*_pb2.py`` when a ``.proto`` changes; they are not in git)."""
