"""The Open Inference Protocol (V2) over real HTTP, driven by Triton's own client (``tritonclient.http``, written
by nobody here), against uvicorn on a free loopback port: health, server and model metadata, inference with
``BYTES`` images in JSON and with the binary tensor extension and with pixel tensors, all equal to what
``/v1/models/{model}/score`` (and ``/segment``) answer for the same images; and the protocol's 400 / 404 error
bodies for bad requests."""
