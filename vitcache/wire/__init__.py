"""What crosses a process boundary, shared by the server and the client.

``tensor_codec`` is the one form embeddings travel in (dtype name, shape, little-endian bytes);
``shm_protocol`` the frames of the same-host shared-memory path; ``timing`` a video result's timing.
No model code and no gRPC, so the client and the integrations load it inside inference servers.
"""
