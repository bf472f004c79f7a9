"""trex.v1: the solve service. trex_pb2*.py are generated from trex.proto by the build step."""
